#!/usr/bin/env python3
"""Generate data/persona_sample.jsonl, a small persona-chat style sample.

All text in this file was written for this project (Apache-2.0); nothing is
copied from the Cynaptics/persona-chat dataset, only its row schema is used:

    {"conv_id": str,            # e.g. "c017"
     "persona_b": [str, ...],   # 3-5 first-person facts about Persona B
     "dialogue": [str, ...],    # "Persona A: ..." / "Persona B: ..." turns,
                                # alternating, starting and ending with A
     "reference": str}          # Persona B's next reply (no prefix)

How it works: a pool of persona facts grouped by topic (job, pets, hobby,
...). Each fact carries a few lines that B can say about it, reactions A can
give, and one follow-up question with answers. A persona is 3-5 facts from
different topics. A conversation is greeting -> one or more topic blocks
(A asks, B answers, optionally A follows up and B answers again) -> optional
goodbye. Every B turn becomes one row whose dialogue is everything before it,
as in the real dataset. All random choices come from one seeded
random.Random, so the output is identical on every run (standard library
only, no set iteration).

Usage:  python data/make_persona_sample.py [--out PATH]
"""

import argparse
import json
import os
import random
import sys
from collections import OrderedDict

SEED = 20240611
N_PERSONAS = 46        # distinct personas
N_CONVERSATIONS = 60   # some personas are used twice with a different partner
MIN_B_TURNS, MAX_B_TURNS = 3, 8
MAX_WORDS_PER_TURN = 40

A_PREFIX = "Persona A: "
B_PREFIX = "Persona B: "


def F(topic, fact, ans, react, fq, fa, hi=None, bye=None, tags=()):
    """One persona fact plus the lines used to talk about it.

    ans   -- B's answers when A asks about the topic (each reveals the fact)
    react -- A's reactions; react[i] is written to fit ans[i]
    fq/fa -- A's follow-up question and B's possible answers
    hi    -- optional (B greeting that mentions the fact, A's reaction)
    bye   -- optional tail for B's goodbye line
    tags  -- used to keep contradictory facts out of one persona
    """
    return {"topic": topic, "fact": fact, "ans": ans, "react": react,
            "fq": fq, "fa": fa, "hi": hi, "bye": bye, "tags": tuple(tags)}


# Tags that may not appear together in one persona.
CONFLICTS = [
    ("old", "student"), ("old", "small_kids"), ("student", "small_kids"),
    ("old", "commute"), ("home_office", "commute"),
    ("nocook", "baker"), ("nocook", "cook"),
    ("noflier", "flier"), ("coder", "learning_code"),
    ("house_owner", "saving_house"), ("old", "grandma"),
]

# --------------------------------------------------------------------------
# Topic-level lines: how A brings a topic up. "plain" asks may get a
# "What about you?" from B, answered by one of A's "self" lines; "share"
# asks already contain something about A.
# --------------------------------------------------------------------------
TOPICS = OrderedDict()
TOPICS["job"] = {
    "plain": ["What do you do for work?", "What keeps you busy during the week?",
              "Are you working these days, or something else?"],
    "share": ["I just survived a very long week at the office. What kind of work do you do?",
              "My job has been pretty boring lately. What do you do all day?"],
    "self": ["I work in an insurance office. It's quiet, but the people are nice.",
             "I manage a small hardware store. Lots of keys cut and paint mixed."],
}
TOPICS["pets"] = {
    "plain": ["Do you have any pets?", "Any animals at home?"],
    "share": ["My neighbor's cat keeps sneaking into my kitchen. Do you have any pets?",
              "I've been thinking about adopting a dog. Do you have any animals?"],
    "self": ["I have an old cat named Miso. She mostly sleeps on my laptop.",
             "No pets yet. My landlord is very strict about it."],
}
TOPICS["hobby"] = {
    "plain": ["What do you like to do in your free time?", "Got any hobbies?",
              "What do you do for fun?"],
    "share": ["I've been trying to find a new hobby, but nothing sticks. What do you do for fun?",
              "I spent all weekend on the couch, which felt great. What do you do in your free time?"],
    "self": ["I mostly bake bread and ruin it. It's still fun.",
             "I've been doing a lot of sketching, just little doodles of my street."],
}
TOPICS["fitness"] = {
    "plain": ["Do you play any sports or work out?", "Are you into sports at all?",
              "How do you stay active?"],
    "share": ["I went for a run this morning and I'm still sore. Do you exercise much?",
              "My friends keep asking me to join their gym. Are you into sports or working out?"],
    "self": ["I walk a lot, but that's about it.",
             "I play tennis badly, once a week, with my cousin."],
}
TOPICS["food"] = {
    "plain": ["What kind of food do you like?", "Are you a big food person?"],
    "share": ["I'm starving, so food is on my mind. What do you like to eat?",
              "I just had the best lunch of my life. Are you a big food person?"],
    "self": ["I'll eat anything with noodles in it.",
             "I'm pretty basic. A good burger makes me happy."],
}
TOPICS["music"] = {
    "plain": ["What kind of music are you into?", "Is music a big part of your life?"],
    "share": ["I've had the same song stuck in my head all day. What kind of music do you like?",
              "I just bought concert tickets for next month. Are you into music?"],
    "self": ["I listen to a bit of everything, mostly old pop.",
             "I like whatever is on the radio, honestly."],
}
TOPICS["travel"] = {
    "plain": ["Do you like to travel?", "Do you travel much?"],
    "share": ["I'm trying to plan a vacation and I can't decide where to go. Do you travel much?",
              "I just got back from visiting my aunt up north. Do you like traveling?"],
    "self": ["I try to take one trip a year, usually somewhere warm.",
             "Not as much as I'd like. Mostly visiting family."],
}
TOPICS["family"] = {
    "plain": ["Do you have a big family?", "Are you close with your family?"],
    "share": ["My sister just had a baby, so family is on my mind. Do you have a big family?",
              "I'm visiting my parents this weekend. Are you close with your family?"],
    "self": ["I have one older sister. We fight, but we're close.",
             "It's just me and my mom, and we talk every day."],
}
TOPICS["home"] = {
    "plain": ["Where do you live?", "What's it like where you live?"],
    "share": ["I'm thinking about moving, so I'm curious. What's it like where you live?",
              "My street is under construction again and it's so loud. Where do you live?"],
    "self": ["I live in the suburbs. Very quiet, lots of lawns.",
             "I'm in a small apartment above a laundromat. It always smells like soap."],
}
TOPICS["media"] = {
    "plain": ["What do you do to unwind at night?", "Read or watched anything good lately?"],
    "share": ["I just finished a show and now I don't know what to do with my evenings. How do you unwind?",
              "I need a new thing to watch or read. Have you found anything good lately?"],
    "self": ["I watch baking competitions until I fall asleep.",
             "I've been rereading books I loved as a kid."],
}
TOPICS["goals"] = {
    "plain": ["Are you working toward anything these days?", "Do you have any big goals right now?"],
    "share": ["I just signed up for a pottery class, trying to do more new things. Are you working on anything new?",
              "I made a list of goals for this year and already forgot half of it. Do you have any goals right now?"],
    "self": ["I'm trying to drink more water. Big dreams.",
             "I want to finally learn how to drive stick."],
}

# --------------------------------------------------------------------------
# Fact pool
# --------------------------------------------------------------------------
FACTS = [
    # ---- job ----
    F("job", "I work night shifts at a bakery.",
      ["I bake bread at a bakery, mostly on the night shift. I'm usually covered in flour by five a.m.",
       "I work at a bakery. Night shifts, so my sleep schedule is a mess, but the bread is worth it."],
      ["Night shifts! That must be rough on your sleep.", "Fresh bread every day sounds like a dream."],
      "What's your favorite thing to bake?",
      ["Sourdough, easily. Shaping the loaves is weirdly relaxing at three in the morning.",
       "Cinnamon rolls. The whole street smells amazing when they come out of the oven."],
      hi=("Hey! Honestly a bit sleepy. I just woke up, I work nights at a bakery.",
          "Oh, so this is basically your morning!"),
      bye="I should nap before my shift anyway.", tags=("baker",)),
    F("job", "I am a nurse at a children's hospital.",
      ["I'm a nurse on the kids' ward at a children's hospital. Long shifts, but the kids are the best part.",
       "I'm a nurse. I work with children at a hospital, which is hard some days and wonderful on others."],
      ["That's such an important job.", "Wow, that must take a lot of patience."],
      "What got you into nursing?",
      ["My mom was a nurse, and I grew up hearing her stories. It felt like the natural path.",
       "I spent a lot of time in hospitals as a kid, and the nurses were always so kind to me."],
      hi=("Hi! Pretty tired, I just finished a twelve-hour shift at the hospital.",
          "Twelve hours? That sounds exhausting."),
      bye="Time for me to get some sleep before my next shift.", tags=("commute",)),
    F("job", "I teach high school chemistry.",
      ["I teach chemistry at a high school. Mostly tenth graders, so there's a lot of energy in the room.",
       "I'm a high school chemistry teacher. Yes, we set things on fire sometimes. Safely."],
      ["Ha, I always loved the experiments in chemistry class.", "Teenagers and chemicals, that sounds brave."],
      "Do your students actually like chemistry?",
      ["Some do! Once we get to lab days, even the quiet ones get into it.",
       "More than you'd think. Nothing sells chemistry like a good color-changing reaction."],
      hi=("Hey! Good, I just finished grading a huge stack of lab reports.",
          "Grading on a weekend, that's dedication."),
      bye="I still have quizzes to grade anyway.", tags=("commute",)),
    F("job", "I drive a delivery truck.",
      ["I drive a delivery truck for a furniture store. I know every shortcut in the city by now.",
       "I do deliveries all day, mostly furniture. It's good for podcasts and bad for my back."],
      ["I bet you know the city better than anyone.", "Carrying furniture all day sounds like a workout."],
      "What's the strangest thing you've delivered?",
      ["A piano, to a fourth-floor apartment with no elevator. Never again.",
       "A bathtub shaped like a seashell. The customer was thrilled, we were confused."],
      bye="I've got an early route tomorrow."),
    F("job", "I am a software developer and I work from home.",
      ["I write software for a small company, fully remote, so my commute is about ten steps.",
       "I'm a software developer. I work from home, which means a lot of coffee and very few real pants."],
      ["A ten-step commute sounds amazing.", "Working from home must be nice, at least some days."],
      "Do you ever miss working in an office?",
      ["Sometimes I miss the chatting, but I don't miss the traffic at all.",
       "Not really. I go to a cafe once a week when I need to see other humans."],
      bye="Back to fixing bugs for me.", tags=("home_office", "coder")),
    F("job", "I retired after thirty years as a mail carrier.",
      ["I'm retired now. I delivered mail for thirty years, so I've walked more miles than I can count.",
       "Nothing official anymore! I retired after three decades as a mail carrier."],
      ["Thirty years! Congratulations on the retirement.", "That's a lot of walking. You've earned the rest."],
      "How are you enjoying retirement?",
      ["Loving it. I still wake up at five, but now I just drink coffee and watch the birds.",
       "It took a few months to get used to. Now my days are full of projects and long naps."],
      tags=("old",)),
    F("job", "I am a college student studying marine biology.",
      ["I'm a student, studying marine biology. I basically want to spend my life near the ocean.",
       "I'm in college right now, majoring in marine biology. Lots of labs and way too much reading."],
      ["Marine biology sounds so cool.", "Oh, that's a fun thing to study."],
      "What's your favorite sea creature?",
      ["Octopuses, no question. They solve puzzles and change color. They're basically aliens.",
       "Sea otters. They hold hands while they sleep so they don't drift apart."],
      hi=("Hi! Stressed but okay. I have a big marine biology exam tomorrow.",
          "Good luck on the exam!"),
      bye="I should probably go study for once.", tags=("student",)),
    F("job", "I work as a hairdresser.",
      ["I'm a hairdresser. I rent my own chair at a salon downtown.",
       "I cut hair for a living. People tell me everything while they're in the chair."],
      ["Having your own chair sounds like a big deal.", "I bet you hear some amazing stories."],
      "What haircut do people ask for the most?",
      ["Honestly, 'just a trim' that turns into something completely different halfway through.",
       "Lots of bangs lately. Then they come back two weeks later wanting to grow them out."],
      bye="I have a whole wedding party to style in the morning.", tags=("commute",)),
    F("job", "I am a firefighter.",
      ["I'm a firefighter. Twenty-four hour shifts, and yes, we really do cook big dinners at the station.",
       "I work as a firefighter. Fewer fires than people think, lots of medical calls."],
      ["Big station dinners sound like the best part.", "That's a seriously brave job."],
      "Who's the best cook at your station?",
      ["Me, obviously. My chili has its own fan club.",
       "Our captain. He makes a lasagna that could end wars."],
      hi=("Hey! Doing good. Quiet day at the fire station so far, knock on wood.",
          "A quiet day at a fire station sounds like a good day."),
      bye="Stay safe out there.", tags=("commute",)),
    F("job", "I work at the public library.",
      ["I'm a librarian at the public library. It's a lot less quiet than people think.",
       "I work at the library downtown. Story time, computer help, and a lot of lost library cards."],
      ["A library job sounds so peaceful.", "I love libraries, that sounds like a great job."],
      "What do people borrow the most?",
      ["Honestly, the cake pans. We lend them out and they're always checked out.",
       "Mystery novels. There's a waiting list for every new one."],
      bye="I have a cart of returns waiting for me.", tags=("commute",)),

    # ---- pets ----
    F("pets", "I have two dogs.",
      ["Yes, two dogs! Both rescues, and both think they're lap dogs.",
       "I have two dogs. They basically run my house."],
      ["Ha, rescues are the best.", "Two dogs! That must keep you busy."],
      "What are their names?",
      ["Biscuit and Pepper. Biscuit is the calm one, Pepper is pure chaos.",
       "Maple and Otis. Otis is afraid of the vacuum, Maple tries to fight it."],
      hi=("Hi! Good, just got back from walking my two dogs in the rain.",
          "Wet dogs, the best smell."),
      bye="The dogs are giving me the walk look anyway."),
    F("pets", "I have a cat named Noodle.",
      ["I have a cat named Noodle. He's orange, so you can guess how smart he is.",
       "Just one cat, Noodle. He sleeps about twenty hours a day."],
      ["Noodle is a great name for a cat.", "Ha, I love that name."],
      "How did you pick the name Noodle?",
      ["He was so skinny and floppy as a kitten. The name just stuck.",
       "My niece named him. She was eating ramen at the time."],
      bye="Noodle is yelling for his dinner."),
    F("pets", "I am allergic to cats.",
      ["Sadly no. I'm allergic to cats, and most of my friends have cats, so I sneeze a lot.",
       "No pets for me. I'm allergic to cats, so I just visit other people's dogs."],
      ["That must be hard if your friends all have cats.", "Oh no, that's rough."],
      "Would you get a dog someday?",
      ["Maybe! I've been reading about which breeds are easier on allergies.",
       "I'd love to. Something small and goofy, once I have a bigger place."]),
    F("pets", "I keep bees in my backyard.",
      ["Kind of! I keep bees in my backyard. Two hives, about fifty thousand tiny pets.",
       "Does a beehive count? I keep bees out back."],
      ["Bees! I did not expect that.", "That's so cool, I've never met a beekeeper."],
      "Do you get honey from them?",
      ["Lots. I give jars away to the whole street every fall.",
       "Yes, and it tastes different every season depending on what's blooming."],
      bye="I need to check on the hives before dark."),
    F("pets", "I have a parrot that talks.",
      ["I have a parrot named Rico who talks more than I do.",
       "Yes, a parrot. He says hello to everyone and copies my phone's ringtone."],
      ["A talking parrot, that's amazing.", "Ha, copying the ringtone is evil."],
      "What's the funniest thing he says?",
      ["He says 'oh no' in exactly my voice every time something falls.",
       "He learned to call my name the way my mom does. I still jump every time."],
      bye="Rico says bye too, probably."),
    F("pets", "I foster kittens for an animal shelter.",
      ["Right now I have four kittens! I foster for the local shelter.",
       "Always, but they change. I foster kittens for a shelter until they get adopted."],
      ["Fostering kittens sounds like the best job ever.", "That's really kind of you."],
      "Is it hard to give them up?",
      ["Every time. But getting photos from their new families makes it worth it.",
       "A little, but then a new batch shows up and I'm too busy to be sad."],
      bye="Time to feed the kittens."),
    F("pets", "I have a horse named Duchess.",
      ["I have a horse, Duchess. She lives at a stable just outside town.",
       "Yes, a horse named Duchess. She's twenty and still very bossy."],
      ["A horse! That's a big pet.", "Duchess sounds like she has attitude."],
      "Do you ride her often?",
      ["Most weekends. We do slow trail rides now, she's earned it.",
       "A few times a week. She's happiest out on the trails."],
      bye="I'm heading out to the stable anyway."),
    F("pets", "I have a tank of tropical fish.",
      ["Just fish! I have a big tank of tropical fish in my living room.",
       "I keep tropical fish. Calmer than a dog, and they don't chew shoes."],
      ["A fish tank sounds so relaxing.", "Ha, fair point about the shoes."],
      "How many fish do you have?",
      ["About twenty. I named the big angelfish Gerald.",
       "I lost count around thirty. The little ones move too fast."]),

    # ---- hobby ----
    F("hobby", "I knit sweaters for my friends.",
      ["I knit a lot. Mostly sweaters for friends, whether they asked for them or not.",
       "Knitting! I'm working on my fifth sweater this year."],
      ["Handmade sweaters are the best gift.", "Five sweaters? That's impressive."],
      "How long does one sweater take?",
      ["About a month if I knit every evening. Longer if the pattern is fancy.",
       "A few weeks. Sleeves are the worst part, and there are always two of them."]),
    F("hobby", "I build model trains.",
      ["I build model trains. My spare room is basically a tiny town now.",
       "Model trains, believe it or not. I've been building the same layout for years."],
      ["A tiny town in your spare room sounds amazing.", "That sounds really detailed."],
      "What's your favorite part to build?",
      ["The little buildings. I even put tiny lights in the windows.",
       "The scenery. I made a whole mountain out of paper and plaster."]),
    F("hobby", "I paint watercolor landscapes.",
      ["I paint, mostly watercolor landscapes. Mountains, lakes, that sort of thing.",
       "I like watercolor painting. I go to the park on weekends and paint the trees."],
      ["Watercolor is so hard, I'm impressed.", "Painting outdoors sounds lovely."],
      "Do you ever sell your paintings?",
      ["I've sold a few at a local craft fair. Mostly I give them away.",
       "Not really, but my mom has about twenty of them on her walls."]),
    F("hobby", "I love doing jigsaw puzzles.",
      ["I'm a big puzzle person. There's always a thousand-piece puzzle on my dining table.",
       "Jigsaw puzzles! It's the only time my brain actually goes quiet."],
      ["A puzzle always on the table, I love that.", "Puzzles are so relaxing."],
      "What's the hardest one you've finished?",
      ["A two-thousand-piece picture of jelly beans. Never again.",
       "One that was almost all blue sky. It took me three months."]),
    F("hobby", "I do woodworking in my garage.",
      ["I do woodworking in my garage. Right now I'm building a bookshelf.",
       "Woodworking, mostly. My garage is more sawdust than garage at this point."],
      ["Building your own furniture is so cool.", "Ha, a sawdust garage sounds about right."],
      "What's the best thing you've made?",
      ["A dining table. It's a little crooked, but we eat at it every day.",
       "A rocking chair for my sister. It took me a whole winter."]),
    F("hobby", "I play chess online every night.",
      ["I play a lot of chess online. Usually a few games every night before bed.",
       "Chess, mostly. I play online every night, even when I'm losing."],
      ["Chess every night, that's dedication.", "I've always wanted to get better at chess."],
      "Are you any good?",
      ["I'm decent. Good enough to win sometimes, bad enough to stay humble.",
       "Getting there. I finally stopped losing my queen in the first ten moves."]),
    F("hobby", "I grow tomatoes and peppers on my balcony.",
      ["I garden, kind of. I grow tomatoes and peppers on my tiny balcony.",
       "Balcony gardening! Tomatoes and peppers, mostly."],
      ["Balcony tomatoes, nice.", "That sounds like a nice way to unwind."],
      "Do you actually get a good harvest?",
      ["Last summer I had so many tomatoes I was giving them to my neighbors.",
       "The peppers do great. The tomatoes mostly feed the squirrels."]),
    F("hobby", "I take photos of birds.",
      ["I do bird photography. I get up early and sit in the park with my camera.",
       "I'm really into photographing birds. It takes a lot of patience."],
      ["Bird photography sounds peaceful.", "That does sound like it needs patience."],
      "What's the best bird you've photographed?",
      ["A heron catching a fish. I got the whole thing in one shot.",
       "A tiny owl in a tree by the river. I waited two hours for it."]),

    # ---- fitness ----
    F("fitness", "I run marathons.",
      ["I run. I've done three marathons so far and I'm training for a fourth.",
       "Running, mostly. I'm doing my fourth marathon this fall."],
      ["Three marathons, that's incredible.", "I get tired just thinking about a marathon."],
      "How much do you run in a week?",
      ["Around forty miles right now. More as the race gets closer.",
       "About thirty-five miles. Sunday is always the long run."],
      bye="I have an early run tomorrow."),
    F("fitness", "I play soccer on a weekend team.",
      ["I play soccer on a weekend team. We're not great, but we have fun.",
       "Yes, soccer! I'm on a team that plays every Saturday."],
      ["Ha, having fun is what matters.", "A Saturday team sounds like fun."],
      "What position do you play?",
      ["Goalkeeper. Nobody else wanted to do it.",
       "Defense. I'm not fast, but I'm stubborn."]),
    F("fitness", "I swim laps every morning.",
      ["I swim laps every morning. It wakes me up better than coffee.",
       "I swim. I'm at the pool every morning at six."],
      ["Every morning? That's discipline.", "Six in the morning, wow."],
      "How far do you usually swim?",
      ["About a mile. It takes me around forty minutes.",
       "Forty laps. I count them so I don't fall asleep."]),
    F("fitness", "I do yoga to relax.",
      ["I do yoga. Nothing fancy, just a class twice a week to relax.",
       "Mostly yoga. It keeps my back from complaining."],
      ["Yoga sounds great for stress.", "I keep meaning to try yoga."],
      "Is it hard to get started?",
      ["Not at all. The first class is mostly breathing and falling over.",
       "Just find a beginner class. Nobody is looking at you, I promise."]),
    F("fitness", "I love rock climbing.",
      ["I go rock climbing. Mostly at the gym, outside when the weather is nice.",
       "Climbing! My hands are always a little scraped up."],
      ["Rock climbing looks so hard.", "That sounds fun and a little scary."],
      "Are you ever scared of heights?",
      ["All the time. That's kind of the fun part.",
       "A little, but once I'm focused on the wall I forget about it."]),
    F("fitness", "I am a huge basketball fan.",
      ["I'm more of a watcher. I'm a huge basketball fan, I never miss a game.",
       "Basketball! I don't play much, but I watch every game I can."],
      ["Basketball games are so exciting.", "A real fan, nice."],
      "Who's your team?",
      ["My hometown team. They break my heart every season, but I stay loyal.",
       "A team from the city where I grew up. It's a family tradition."]),
    F("fitness", "I bike to work every day.",
      ["I bike everywhere, including to work every day. Rain or shine.",
       "I ride my bike to work every day. It's my exercise and my commute."],
      ["Rain or shine, that's committed.", "Exercise and commute at once, smart."],
      "How long is your ride?",
      ["About twenty minutes each way. Longer if I take the river path.",
       "Half an hour. Uphill on the way home, sadly."],
      tags=("commute",)),
    F("fitness", "I hate the gym but I love hiking.",
      ["I hate the gym, honestly. But I love hiking, so that's my exercise.",
       "Not really workouts. I'd rather go on a long hike in the woods."],
      ["Hiking counts as exercise to me!", "Same, the gym is boring."],
      "Where do you like to hike?",
      ["There are trails by the lake near me. I go most Sundays.",
       "Anywhere with a waterfall at the end. That's the reward."]),

    # ---- food ----
    F("food", "I am a vegetarian.",
      ["I'm vegetarian, so there's a lot of curry and pasta in my kitchen.",
       "I don't eat meat, I've been vegetarian for ten years. Spicy lentils are my favorite."],
      ["Curry is the best.", "Ten years, that's a long time."],
      "What's your go-to meal?",
      ["Chickpea curry with rice. I make a huge pot on Sundays.",
       "Veggie tacos with lots of lime. Quick and always good."],
      tags=("cook",)),
    F("food", "I love making spicy food.",
      ["I love anything spicy. I cook with way too many chili peppers.",
       "Spicy food! If my eyes aren't watering, I add more chili."],
      ["Ha, you must have a strong stomach.", "I wish I could handle spice like that."],
      "What's the spiciest thing you've eaten?",
      ["A ghost pepper wing. I couldn't feel my lips for an hour.",
       "My own hot sauce. I made it too strong and had to give it away."],
      tags=("cook",)),
    F("food", "I bake a pie every Sunday.",
      ["I bake a pie every Sunday. Apple, cherry, whatever is in season.",
       "I'm a baker at heart. I make a pie every Sunday, it's a tradition."],
      ["A pie every week, your friends are lucky.", "That's a great tradition."],
      "What's your best pie?",
      ["Peach. It's my grandmother's recipe, with a little cinnamon.",
       "Pumpkin, but I only make it in the fall."],
      tags=("cook",)),
    F("food", "I can't cook at all.",
      ["Honestly, I can't cook at all. I burn toast. Takeout is my best friend.",
       "I love eating, but I don't cook. The smoke alarm is my kitchen timer."],
      ["Takeout is a valid lifestyle.", "Ha, the smoke alarm as a timer."],
      "What's your favorite takeout?",
      ["Pad thai from the place down the street. They know my order by heart.",
       "Pizza, every Friday. It's basically a religion at this point."],
      tags=("nocook",)),
    F("food", "My favorite food is sushi.",
      ["Sushi, all day. I could eat it every week.",
       "Definitely sushi. I'll try anything, but sushi is my favorite."],
      ["Sushi is so good.", "I'm with you on sushi."],
      "Do you have a favorite roll?",
      ["Anything with salmon and avocado. Simple, but perfect.",
       "Spicy tuna. I always ask for extra ginger on the side."]),
    F("food", "I love trying new restaurants.",
      ["I'm a total foodie. I try a new restaurant almost every week.",
       "I love eating out. Trying new places is basically my hobby."],
      ["Every week, that's adventurous.", "That sounds like a fun way to explore."],
      "What's the best place you've tried lately?",
      ["A tiny Ethiopian spot near my work. I've been back three times.",
       "A dumpling place that only has six tables. Worth the wait."]),
    F("food", "I drink way too much coffee.",
      ["I'm not picky about food, but I drink way too much coffee. Four cups a day, minimum.",
       "Food, sure, but coffee more. I'm probably half coffee at this point."],
      ["Four cups! Impressive.", "Ha, same here."],
      "How do you take it?",
      ["Black, strong, and right away.",
       "With oat milk. Anything else is too bitter for me."]),
    F("food", "I make my own pasta from scratch.",
      ["I love cooking Italian. I even make my own pasta from scratch.",
       "Homemade pasta is my thing. It's messier than it looks."],
      ["Fresh pasta is so much better.", "Homemade pasta, fancy!"],
      "Is it hard to make?",
      ["It's just flour and eggs. The hard part is rolling it thin enough.",
       "Not really, it just takes time. It's good for a rainy afternoon."],
      tags=("cook",)),

    # ---- music ----
    F("music", "I play the violin.",
      ["Music is huge for me. I play violin in a community orchestra.",
       "I play the violin, so mostly classical. I've been in a local orchestra for a few years."],
      ["Violin is such a beautiful instrument.", "An orchestra, that's so cool."],
      "How long have you been playing?",
      ["Since I was seven. My parents made me, and now I'm glad they did.",
       "About fifteen years, with a long break in college."]),
    F("music", "I love country music.",
      ["I'm a country music person. Give me a sad song about a truck any day.",
       "Country, mostly. I know it's not for everyone."],
      ["Ha, the sad truck song is a classic.", "No judgment, country has some great stories."],
      "Have you seen anyone live?",
      ["Lots! I go to a big outdoor festival every summer.",
       "A few shows at a small bar in town. Those are the best ones."]),
    F("music", "I sing in a church choir.",
      ["I sing in the choir at my church. Alto section, represent.",
       "Yes, I sing! I'm in a church choir that practices every Thursday."],
      ["Choirs sound so beautiful in person.", "That's lovely."],
      "Do you ever sing solos?",
      ["Once, at Christmas. My knees were shaking the whole time.",
       "Not yet. I like hiding in the middle of the altos."]),
    F("music", "I collect vinyl records.",
      ["I collect vinyl records. Mostly old soul and funk.",
       "I'm a record collector. I have around six hundred albums."],
      ["Vinyl sounds so warm.", "Six hundred albums, wow."],
      "What's the best record you've found?",
      ["A first pressing of a soul album for two dollars at a garage sale.",
       "An old jazz record my grandfather used to play. Found it at a flea market."]),
    F("music", "I play drums in a garage band.",
      ["I play drums in a band with some friends. We practice in my garage.",
       "I'm a drummer! Our little garage band plays at a bar downtown sometimes."],
      ["Your neighbors must love you.", "A real band, that's awesome."],
      "What kind of music does your band play?",
      ["Loud rock covers, mostly. We're working on our first original song.",
       "A mix of punk and pop. It's loud, and that's all I care about."],
      bye="I have band practice in an hour."),
    F("music", "I listen to classical music while I work.",
      ["I mostly listen to classical music, especially while I work. It helps me focus.",
       "Classical. Piano music, mostly. It's on all day while I work."],
      ["Classical is great for focus.", "I should try that while working."],
      "Do you have a favorite composer?",
      ["Chopin. His pieces are calm but never boring.",
       "Bach. It sounds like math, in a good way."]),
    F("music", "I am learning to play the guitar.",
      ["I'm learning guitar right now. My fingers hurt, but I'm getting there.",
       "I'm teaching myself guitar from online videos. Slowly."],
      ["Sore fingers are part of it, right?", "Good for you, guitar is hard."],
      "What song are you learning?",
      ["A simple folk song with four chords. I've played it about a thousand times.",
       "The intro to an old rock song. My family is very tired of it."]),
    F("music", "I go to a concert every month.",
      ["I love live music. I go to a concert at least once a month.",
       "Live music is my thing. I try to see a show every month."],
      ["Once a month, that's a lot of shows.", "Live music is the best."],
      "What's the best concert you've been to?",
      ["A tiny folk show in a bookstore. Maybe thirty people, but it was magical.",
       "A big outdoor show in the rain. Everyone was soaked and nobody cared."]),

    # ---- travel ----
    F("travel", "I have visited twenty countries.",
      ["I love to travel. I've been to twenty countries so far.",
       "Yes! Twenty countries and counting."],
      ["Twenty countries, that's amazing.", "Wow, you've seen a lot."],
      "Which one was your favorite?",
      ["Portugal. Great food, friendly people, and the ocean everywhere.",
       "Japan. Everything was beautiful, even the train stations."],
      tags=("flier",)),
    F("travel", "I have never been on a plane.",
      ["Not really. I've actually never been on a plane.",
       "I haven't traveled much. I've never even flown."],
      ["Never? That's surprising.", "Huh, I wouldn't have guessed that."],
      "Is there somewhere you'd like to go?",
      ["Ireland. My family is from there, and I'd love to see it.",
       "The Grand Canyon. Maybe I'll just drive there."],
      tags=("noflier",)),
    F("travel", "I go camping every summer.",
      ["Mostly road trips. I go camping every summer with my cousins.",
       "I do one big camping trip every summer. Tents, campfires, too many mosquitoes."],
      ["Camping with cousins sounds fun.", "Ha, the mosquitoes are part of the experience."],
      "Where do you usually camp?",
      ["A state park by a lake. We've gone to the same spot for years.",
       "Up in the mountains. It gets cold at night, even in July."]),
    F("travel", "I lived in Spain for a year.",
      ["I love it. I lived in Spain for a year after college and I still miss it.",
       "Yes! I even spent a whole year living in Spain."],
      ["Spain, that must have been wonderful.", "A whole year abroad, that's great."],
      "Do you still speak Spanish?",
      ["A little. Enough to order food and apologize.",
       "I try to. I watch shows in Spanish so I don't forget it."],
      tags=("flier",)),
    F("travel", "I want to visit Japan someday.",
      ["Not as much as I'd like. I really want to visit Japan someday.",
       "I'm saving up for a trip to Japan. It's been my dream for years."],
      ["Japan is on my list too.", "Saving up is the hard part."],
      "What would you do there first?",
      ["Eat everything. Then see the old temples.",
       "Ride the bullet train, just to say I did."]),
    F("travel", "I take a trip with my best friend every spring.",
      ["I try to. My best friend and I take a trip together every spring.",
       "Every spring! My best friend and I pick a new city each year."],
      ["A yearly trip with your best friend, I love that.", "That's a great tradition."],
      "Where did you go this year?",
      ["Montreal. We ate our weight in bagels.",
       "New Orleans. The music everywhere was incredible."]),
    F("travel", "I love road trips.",
      ["I love road trips. Give me a full tank and a good playlist.",
       "Road trips are my favorite way to travel. I drove across the country last year."],
      ["Road trips are the best.", "Across the country, wow."],
      "What's the best place you've stopped?",
      ["A tiny diner in the desert with the best pie I've ever had.",
       "A small town with a giant statue of a cow. No idea why it was there."]),
    F("travel", "I would rather stay home than travel.",
      ["Honestly, not much. I'm a homebody, I like my own bed.",
       "I prefer staying home. Travel stresses me out."],
      ["Nothing beats your own bed.", "That's fair, travel can be stressful."],
      "So what do you do with your days off?",
      ["Sleep in, make a big breakfast, and read. Perfect.",
       "Work on little projects around the house. It's relaxing to me."]),

    # ---- family ----
    F("family", "I have three younger brothers.",
      ["I have three younger brothers. The house was never quiet growing up.",
       "Yes, three little brothers. I'm the oldest, so I was basically a third parent."],
      ["Three brothers, wow.", "Being the oldest is a lot of responsibility."],
      "Are you all close now?",
      ["Very. We have a group chat that never stops.",
       "We are. We get together for a big dinner once a month."]),
    F("family", "I am an only child.",
      ["I'm an only child, so it's just me and my parents.",
       "No siblings, I'm an only child. My cousins were like siblings, though."],
      ["Only child, so you got all the attention.", "Cousins count!"],
      "Did you ever wish you had siblings?",
      ["Sometimes, but I got my own room, so I can't complain.",
       "When I was little, yes. Now I like the quiet."]),
    F("family", "My daughter just started college.",
      ["I have a daughter who just started college. The house feels so empty.",
       "One daughter. She just left for college, so I'm adjusting."],
      ["That must be a big change.", "An empty nest already!"],
      "What is she studying?",
      ["Engineering. She's always been good at fixing things.",
       "Art history. She called me last night just to talk about paintings."],
      tags=("old",)),
    F("family", "I am a twin.",
      ["I'm a twin! My sister and I still talk every day.",
       "I have a twin brother. People used to mix us up all the time."],
      ["A twin, that's so fun.", "Ha, I bet you had fun with that."],
      "Do you look alike?",
      ["Not really. Our friends say we act more alike than we look.",
       "Pretty much, except I have shorter hair."]),
    F("family", "I live with my grandmother.",
      ["I live with my grandmother. She's eighty-five and sharper than me.",
       "Small but close. I actually live with my grandma and help her out."],
      ["Eighty-five and sharp, I love it.", "That's really sweet."],
      "What's she like?",
      ["Funny and stubborn. She beats me at cards every night.",
       "She tells the best stories about growing up on a farm."],
      tags=("grandma",)),
    F("family", "I have two kids under five.",
      ["I have two kids, both under five. So my life is mostly snacks and cartoons.",
       "Two little kids! A three-year-old and a baby."],
      ["Snacks and cartoons, sounds about right.", "Two little kids, you must be tired."],
      "How do you find time for yourself?",
      ["Nap time. Those two hours are sacred.",
       "Early mornings. I get up before them just to drink coffee in peace."],
      hi=("Hi! Good, I think. Both kids are finally asleep, so I have a minute.",
          "Ha, enjoy the quiet while it lasts."),
      bye="I hear a kid waking up anyway.", tags=("small_kids",)),
    F("family", "I am the youngest of six kids.",
      ["I'm the youngest of six. I had a lot of hand-me-downs.",
       "Big family! I'm the youngest of six kids."],
      ["Six kids, that's a big family.", "The youngest, so you got away with everything."],
      "What are family holidays like?",
      ["Loud. Someone always burns something and everyone argues about board games.",
       "Chaos, in the best way. We need two tables just for dinner."]),
    F("family", "My parents own a restaurant.",
      ["Not big, but close. My parents run a restaurant, and I basically grew up there.",
       "My parents own a small restaurant, so family time usually happens in the kitchen."],
      ["Growing up in a restaurant sounds fun.", "Family time in the kitchen, I love that."],
      "What kind of food do they serve?",
      ["Vietnamese. Their pho is the best in town, and I'm not biased at all.",
       "Mostly Mexican dishes. My dad's mole takes two days to make."]),

    # ---- home ----
    F("home", "I live on a farm.",
      ["I live on a farm out in the countryside. Lots of space and lots of chores.",
       "Way out in the country. I live on a small farm."],
      ["Lots of chores, I bet.", "Farm life sounds peaceful."],
      "What do you grow?",
      ["Corn, mostly, and a big vegetable garden for us.",
       "Apples! We have about a hundred trees."],
      bye="The chickens won't feed themselves.", tags=("house_owner",)),
    F("home", "I live in a small apartment in the city.",
      ["I live in a tiny apartment right in the city. Noisy, but everything is close.",
       "City apartment, very small. I can touch both walls of my kitchen."],
      ["City life has its perks.", "Ha, tiny kitchens are the worst."],
      "What do you like most about the city?",
      ["I can walk to everything. I haven't owned a car in years.",
       "The food. There's a different restaurant on every corner."]),
    F("home", "I just moved to a new town.",
      ["I actually just moved to a new town, so I'm still figuring it out.",
       "I'm new around here. I moved two months ago."],
      ["Moving is a big deal.", "Starting somewhere new is exciting."],
      "Have you made any friends yet?",
      ["A few. My neighbor invited me to her book club.",
       "Slowly. I joined a trivia team at a bar, which helps."]),
    F("home", "I live near the beach.",
      ["I live about five minutes from the beach. I walk there every evening.",
       "Right by the ocean. I can hear the waves at night."],
      ["That sounds like a dream.", "Hearing waves at night, so nice."],
      "Do you go in the water a lot?",
      ["In summer, every day. In winter, I just look at it.",
       "Not much, it's freezing. I mostly walk and look for shells."]),
    F("home", "I live in a small mountain town.",
      ["I live in a small mountain town. Everyone knows everyone.",
       "A little mountain town. Snow half the year and one traffic light."],
      ["That sounds cozy.", "One traffic light, I love it."],
      "Do you like living there?",
      ["Love it. Nothing beats the first snow of the year.",
       "Mostly. The winters are long, but the summers make up for it."]),
    F("home", "I live on a houseboat.",
      ["I live on a houseboat! It's small, but the view is always changing.",
       "On the water, actually. I live on a houseboat on the river."],
      ["A houseboat, that's so unique.", "That's such a cool place to live."],
      "Do you ever get seasick?",
      ["Only in storms. Most days it just rocks a little.",
       "Not anymore. The first month was rough, though."]),
    F("home", "I am fixing up an old house.",
      ["I bought an old house and I'm fixing it up myself. Slowly.",
       "I'm renovating an old farmhouse. Every wall has a surprise in it."],
      ["Fixing up an old house is a big project.", "Ha, surprises in the walls sound scary."],
      "What room are you working on now?",
      ["The kitchen. I've been washing dishes in the bathtub for a month.",
       "The porch. I want to sit out there by summer."],
      tags=("house_owner",)),
    F("home", "I live in a cabin in the woods.",
      ["I live in a cabin in the woods. My closest neighbor is a mile away.",
       "Out in the woods, in a little cabin. Very quiet."],
      ["A mile away, that's real privacy.", "That sounds so peaceful."],
      "Doesn't it get lonely?",
      ["Not really. I have the birds, and town is only twenty minutes away.",
       "Sometimes in winter. That's when I call my friends more."]),

    # ---- media ----
    F("media", "I read mystery novels.",
      ["I read a lot of mystery novels. I always try to guess the killer.",
       "Mystery books! I just finished one I couldn't put down."],
      ["Mysteries are so addictive.", "I love a good whodunit."],
      "Do you usually guess the ending?",
      ["About half the time. The good ones still surprise me.",
       "Almost never, which is why I keep reading them."]),
    F("media", "I watch a lot of cooking shows.",
      ["I watch way too many cooking shows. Baking competitions especially.",
       "Cooking shows, constantly. It's my comfort TV."],
      ["Ha, cooking shows are so relaxing.", "Comfort TV is important."],
      "Which one is your favorite?",
      ["The one where home bakers compete in a tent. Nobody is mean, it's lovely.",
       "Anything where people cook with mystery ingredients. The panic is the fun part."]),
    F("media", "I love horror movies.",
      ["Horror movies are my favorite. The scarier the better.",
       "I watch a lot of horror movies. I sleep with the light on sometimes, but it's worth it."],
      ["I'm way too scared for horror.", "Ha, worth it, sure."],
      "What's the scariest one you've seen?",
      ["An old one about a haunted lighthouse. I still think about it.",
       "One with no music at all, just silence. Somehow that was worse."]),
    F("media", "I listen to history podcasts.",
      ["I listen to history podcasts nonstop. Right now it's all about ancient Rome.",
       "Podcasts, mostly history ones. I know way too much about old kings."],
      ["History podcasts are great.", "Ha, old kings are a good topic."],
      "What's the most interesting thing you've learned?",
      ["Ancient Romans made a kind of concrete that gets stronger in seawater.",
       "Some medieval towns put animals on trial. Actual pigs in court."]),
    F("media", "I play video games online with my friends.",
      ["I play video games online with my friends most nights. It's how we hang out.",
       "Gaming, mostly. My friends and I play together online in the evenings."],
      ["That's a fun way to keep in touch.", "Gaming with friends is the best."],
      "What are you playing right now?",
      ["A building game where we're making a giant castle together. It's taken weeks.",
       "A farming game, believe it or not. Very relaxing."]),
    F("media", "I love old black and white movies.",
      ["I'm into old black and white movies. They don't write dialogue like that anymore.",
       "Classic movies, the black and white ones. I watch one every Friday."],
      ["Old movies have such great style.", "Friday movie nights, nice."],
      "Do you have a favorite?",
      ["Anything with fast-talking reporters. The jokes come a mile a minute.",
       "An old detective movie with lots of fog and trench coats."]),
    F("media", "I read science fiction.",
      ["I read a lot of science fiction. Spaceships, robots, all of it.",
       "Sci-fi books, always. I just finished one about a city on Mars."],
      ["Sci-fi is so imaginative.", "A city on Mars sounds cool."],
      "Any books you'd recommend?",
      ["Anything about first contact with aliens. Those are my favorite stories.",
       "Start with short story collections. Lots of great ideas in a few pages."]),
    F("media", "I do the crossword every night.",
      ["I do the crossword every night. It's my way to wind down.",
       "Crosswords! I do one before bed every single night."],
      ["Crosswords are tough.", "That's a nice routine."],
      "Do you do them in pen?",
      ["Only on Mondays. The Saturday ones humble me.",
       "Always. I like living dangerously."]),

    # ---- goals ----
    F("goals", "I am learning French.",
      ["I'm learning French. I practice on an app every day.",
       "French! I'm taking evening classes twice a week."],
      ["Bonne chance!", "French is a beautiful language."],
      "Why French?",
      ["I want to visit Paris and actually talk to people.",
       "My partner's family is from Quebec. I want to keep up at dinner."]),
    F("goals", "I want to open my own bakery someday.",
      ["I'm saving up to open my own bakery someday.",
       "My big goal is to open a little bakery of my own."],
      ["That would be amazing.", "Your own bakery, I'd visit."],
      "What would you sell?",
      ["Croissants and really good coffee. Keep it simple.",
       "Pies and cookies, and one weird special every week."],
      tags=("cook",)),
    F("goals", "I am training to become a pilot.",
      ["I'm taking flying lessons. I want to get my pilot's license this year.",
       "I'm training to be a pilot! I've done about twenty hours in the air so far."],
      ["Flying lessons, that's so exciting.", "Twenty hours already, nice."],
      "Were you nervous the first time?",
      ["Terrified. Then I looked down and forgot to be scared.",
       "Very. My instructor told me to breathe about fifty times."],
      tags=("flier",)),
    F("goals", "I am teaching myself to code.",
      ["I'm teaching myself to code in the evenings. I just made my first little website.",
       "Coding! I'm learning it online, slowly."],
      ["Your first website, congrats.", "That's a useful skill."],
      "What are you building?",
      ["A website with my grandma's recipes. She's very proud of it.",
       "A little map of the hiking trails near me. Mostly photos so far."],
      tags=("learning_code",)),
    F("goals", "I am writing a novel.",
      ["I'm writing a novel. Well, trying to. I'm on chapter four.",
       "My goal this year is to finish the novel I started ages ago."],
      ["Chapter four, that's real progress.", "Writing a novel is a huge project."],
      "What's it about?",
      ["A small-town mystery with a very nosy cat.",
       "Two sisters who run a lighthouse. It's a little spooky."]),
    F("goals", "I am saving money to buy a house.",
      ["I'm saving up to buy my first house. Lots of rice and beans right now.",
       "Saving for a house. It's slow, but I'm getting close."],
      ["Saving is hard, good for you.", "Your first house, exciting."],
      "What kind of place do you want?",
      ["Something small with a yard. Nothing fancy.",
       "An old house with a big porch. I'd sit out there every evening."],
      tags=("saving_house",)),
    F("goals", "I take salsa dancing classes.",
      ["I just started salsa dancing classes. I'm terrible, but it's fun.",
       "Salsa dancing! I take a class every Tuesday."],
      ["Being bad at something new is part of it.", "Salsa looks so fun."],
      "Do you have a dance partner?",
      ["We rotate in class. I've stepped on everyone's feet by now.",
       "My best friend signed up with me. We laugh the whole time."]),
    F("goals", "I am trying to read fifty books this year.",
      ["I'm trying to read fifty books this year. I'm at thirty-one.",
       "My goal is fifty books this year. It's going okay."],
      ["Fifty books is a lot.", "That's a great goal."],
      "What's the best one so far?",
      ["A memoir by a mountain climber. I couldn't put it down.",
       "A funny novel about a family road trip. I laughed out loud on the bus."]),
]

# --------------------------------------------------------------------------
# Conversation frame lines
# --------------------------------------------------------------------------
A_GREETINGS = ["Hi! How are you doing today?", "Hey there, how's it going?",
               "Hello! How's your day been so far?", "Hi, nice to meet you! How are you?",
               "Hey! How's your week going?"]
# (B greeting, A's possible reactions to it)
B_GREETINGS = [
    ("Hi! I'm doing well, thanks. How about you?",
     ["I'm good, thanks for asking!", "Pretty good, thanks."]),
    ("Hey! Not bad at all. Just relaxing after a long day.",
     ["Same here, it's been a long one.", "Nice, you deserve it."]),
    ("Hello! I'm great, thanks. It's finally sunny here.",
     ["Lucky you, it's raining here.", "Sunshine always helps."]),
    ("Hi there. Honestly a little tired, but happy to chat.",
     ["Tired is fair, it's been that kind of week.", "I hear you."]),
    ("Hey! I'm fine, thanks. How's your day going?",
     ["Not bad at all, thanks.", "Pretty busy, but good."]),
    ("Good, thanks! Just finished dinner.",
     ["Nice, I'm about to make mine.", "Good timing, I just ate too."]),
]
# A's reactions after a follow-up answer (kept neutral on purpose)
A_SHORT_REACTS = ["Ha, I love that.", "Oh, interesting.", "That's great.",
                  "Ha, nice.", "Oh, fun.", "That sounds great."]
A_GENERIC_REACTS = ["Oh, interesting.", "I see.", "Got it."]
# (A's goodbye, B's possible openings for the goodbye reply)
A_CLOSINGS = [
    ("Well, I should get going. It was really nice talking to you!",
     ["Nice talking to you too!", "You too!"]),
    ("I have to run, but this was fun. Talk again soon?",
     ["Definitely!", "For sure!"]),
    ("Anyway, I'll let you go. Have a great night!",
     ["Thanks, you too!", "You too, have a good one!"]),
    ("This was a great chat. I need to head out, though.",
     ["Same here!", "Agreed, this was fun."]),
]
B_BYE_TAILS = ["Take care.", "Talk soon.", "Enjoy your evening."]
WHAT_ABOUT_YOU = ["What about you?", "How about you?"]


def lower_first(s):
    return s if s.startswith("I ") or s.startswith("I'") else s[0].lower() + s[1:]


def tags_conflict(tags):
    for x, y in CONFLICTS:
        if x in tags and y in tags:
            return True
    return False


def make_personas(rng, n):
    by_topic = OrderedDict((t, [f for f in FACTS if f["topic"] == t]) for t in TOPICS)
    topics = list(TOPICS)
    personas, seen = [], []
    while len(personas) < n:
        k = rng.choice([3, 4, 4, 5, 5])
        chosen_topics = rng.sample(topics, k)
        if "job" not in chosen_topics and rng.random() < 0.6:
            chosen_topics[0] = "job"
        facts, tags = [], []
        for t in chosen_topics:
            options = [f for f in by_topic[t] if not tags_conflict(tags + list(f["tags"]))]
            if not options:
                break
            f = rng.choice(options)
            facts.append(f)
            tags.extend(f["tags"])
        if len(facts) < 3:
            continue
        key = tuple(sorted(f["fact"] for f in facts))
        if key in seen:
            continue
        seen.append(key)
        personas.append(facts)
    return personas


def plan_blocks(rng, n_b, n_facts):
    """Split n_b B turns into: greeting (1), topic blocks (1 or 2 each), closing (0/1)."""
    body = n_b - 1
    closing = 1 if (body > 2 * n_facts or (body >= 3 and rng.random() < 0.6)) else 0
    body -= closing
    n_blocks = max(1, -(-body // 2))                      # at least ceil(body/2)
    n_blocks = min(n_facts, rng.randint(n_blocks, min(n_facts, body)))
    sizes = [1] * n_blocks
    extra = body - n_blocks
    idx = list(range(n_blocks))
    rng.shuffle(idx)
    for i in idx[:extra]:
        sizes[i] = 2
    assert sum(sizes) == body and all(s in (1, 2) for s in sizes)
    return sizes, closing


def make_conversation(rng, persona, n_b, avoid_first=()):
    """Return the full list of turns (A, B, A, B, ...) with exactly n_b B turns."""
    facts = list(persona)
    rng.shuffle(facts)
    # on a persona's second conversation, talk about other facts first
    facts.sort(key=lambda f: f["fact"] in avoid_first)
    sizes, closing = plan_blocks(rng, n_b, len(facts))
    discussed = facts[:len(sizes)]
    spare = [f for f in facts[len(sizes):] if f["hi"]]

    turns = []
    turns.append(A_PREFIX + rng.choice(A_GREETINGS))
    if spare and rng.random() < 0.7:
        b_hi, a_react = spare[0]["hi"]
        a_react = [a_react]
    else:
        b_hi, a_react = rng.choice(B_GREETINGS)
    turns.append(B_PREFIX + b_hi)
    pending = rng.choice(a_react)  # what A says first in the next turn
    asked_back = None              # topic B asked A about ("What about you?")

    for f, size in zip(discussed, sizes):
        topic = TOPICS[f["topic"]]
        if rng.random() < 0.35:
            ask, plain = rng.choice(topic["share"]), False
        else:
            ask, plain = rng.choice(topic["plain"]), True
            if rng.random() < 0.2:
                ask = "So, " + lower_first(ask)
        turns.append(A_PREFIX + (pending + " " + ask if pending else ask))
        i = rng.randrange(len(f["ans"]))
        ans = f["ans"][i]           # react[i] is written to fit ans[i]
        if size == 1 and plain and rng.random() < 0.35:
            ans = ans + " " + rng.choice(WHAT_ABOUT_YOU)
            asked_back = f["topic"]
        turns.append(B_PREFIX + ans)
        if asked_back:
            pending = rng.choice(TOPICS[asked_back]["self"])
            asked_back = None
        else:
            pending = f["react"][i] if rng.random() < 0.9 else rng.choice(A_GENERIC_REACTS)
        if size == 2:
            turns.append(A_PREFIX + pending + " " + f["fq"])
            turns.append(B_PREFIX + rng.choice(f["fa"]))
            pending = rng.choice(A_SHORT_REACTS)

    if closing:
        a_close, b_openers = rng.choice(A_CLOSINGS)
        turns.append(A_PREFIX + pending + " " + a_close)
        byes = [f["bye"] for f in persona if f["bye"]]
        tail = rng.choice(byes) if byes and rng.random() < 0.75 else rng.choice(B_BYE_TAILS)
        turns.append(B_PREFIX + rng.choice(b_openers) + " " + tail)

    assert sum(t.startswith(B_PREFIX) for t in turns) == n_b, (n_b, sizes, closing)
    return turns, [f["fact"] for f in discussed]


def conversation_rows(conv_id, persona_b, turns):
    rows = []
    for i in range(1, len(turns), 2):
        rows.append({"conv_id": conv_id,
                     "persona_b": list(persona_b),
                     "dialogue": turns[:i],
                     "reference": turns[i][len(B_PREFIX):]})
    return rows


def build_rows():
    rng = random.Random(SEED)
    personas = make_personas(rng, N_PERSONAS)
    # every persona once, plus a few personas a second time (new partner/topics)
    assignment = list(range(N_PERSONAS)) + rng.sample(range(N_PERSONAS),
                                                      N_CONVERSATIONS - N_PERSONAS)
    rng.shuffle(assignment)
    rows, talked_about = [], {}
    for c, p_idx in enumerate(assignment, start=1):
        persona = personas[p_idx]
        persona_b = [f["fact"] for f in persona]
        n_b = rng.randint(MIN_B_TURNS, MAX_B_TURNS)
        turns, discussed = make_conversation(rng, persona, n_b,
                                             avoid_first=talked_about.get(p_idx, ()))
        talked_about.setdefault(p_idx, discussed)
        rows.extend(conversation_rows("c%03d" % c, persona_b, turns))
    rows.sort(key=lambda r: (r["conv_id"], len(r["dialogue"])))
    return rows


def validate(path):
    keys = {"conv_id", "persona_b", "dialogue", "reference"}
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            row = json.loads(line)
            where = "line %d" % n
            assert set(row) == keys, where
            assert isinstance(row["conv_id"], str) and row["conv_id"], where
            assert isinstance(row["persona_b"], list) and 3 <= len(row["persona_b"]) <= 5, where
            assert all(isinstance(p, str) and p.startswith(("I ", "I'", "My ")) for p in row["persona_b"]), where
            d = row["dialogue"]
            assert isinstance(d, list) and d and len(d) % 2 == 1, where
            for i, turn in enumerate(d):
                assert isinstance(turn, str), where
                prefix = A_PREFIX if i % 2 == 0 else B_PREFIX
                assert turn.startswith(prefix) and len(turn) > len(prefix), where
                other = B_PREFIX if i % 2 == 0 else A_PREFIX
                assert other not in turn and prefix not in turn[len(prefix):], where
                assert len(turn[len(prefix):].split()) <= MAX_WORDS_PER_TURN, where
            assert d[-1].startswith(A_PREFIX), where
            ref = row["reference"]
            assert isinstance(ref, str) and ref.strip(), where
            assert "Persona A:" not in ref and "Persona B:" not in ref, where
            assert len(ref.split()) <= MAX_WORDS_PER_TURN, where
            rows.append(row)
    # rows ordered by conv_id; within a conversation each row extends the previous one
    ids = [r["conv_id"] for r in rows]
    assert ids == sorted(ids), "rows not ordered by conv_id"
    by_conv = OrderedDict()
    for r in rows:
        by_conv.setdefault(r["conv_id"], []).append(r)
    for cid, rs in by_conv.items():
        assert MIN_B_TURNS <= len(rs) <= MAX_B_TURNS, cid
        for k, r in enumerate(rs):
            assert r["persona_b"] == rs[0]["persona_b"], cid
            assert len(r["dialogue"]) == 2 * k + 1, cid
            if k:
                prev = rs[k - 1]
                assert r["dialogue"][:-1] == prev["dialogue"] + [B_PREFIX + prev["reference"]], cid
    personas = sorted({tuple(sorted(r["persona_b"])) for r in rows})
    stats = OrderedDict([
        ("rows", len(rows)),
        ("conversations", len(by_conv)),
        ("distinct_personas", len(personas)),
        ("mean_dialogue_turns", round(sum(len(r["dialogue"]) for r in rows) / len(rows), 2)),
        ("mean_words_per_reference", round(sum(len(r["reference"].split()) for r in rows) / len(rows), 2)),
        ("file_bytes", os.path.getsize(path)),
    ])
    assert 300 <= stats["rows"] <= 400, stats
    assert stats["conversations"] >= 50 and stats["distinct_personas"] >= 40, stats
    assert stats["file_bytes"] < 400 * 1024, stats
    return stats


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "persona_sample.jsonl"))
    args = ap.parse_args(argv)
    rows = build_rows()
    with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    stats = validate(args.out)
    for k, v in stats.items():
        print("%s: %s" % (k, v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
