"""How well the adapter plays Persona B, judged on the held-out conversations, for the base and the tuned model.

- loss and perplexity on Persona B's reply tokens only (the training loss mask), token-weighted;
- unigram F1 of greedy replies against each row's `reference` (ParlAI's normalisation);
- persona consistency of those replies: with NLI_MODEL, the C-score of Madotto et al. (2019): per reply the sum
  over the persona facts of +1 entailed / 0 neutral / -1 contradicted; without it, a lighter proxy: per reply,
  the largest share of one fact's content words that the reply uses ("persona word overlap"), which rewards
  replies that draw on the persona and is also computed for the human references as a yardstick;
- a few sample generations: persona, context, reference, base reply, tuned reply.

"Base" is the 4-bit base with the adapter disabled (peft's `disable_adapter`), the persona tokens at their
initial rows. Generation is greedy and evaluation runs without dropout, under a forked RNG, so evaluating at a
checkpoint leaves the training run's numbers untouched.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .data import IGNORE_INDEX, TEMPLATE, Row

SAMPLES_SHOWN = 5
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
# Words too common to show that a reply draws on a persona fact.
STOPWORDS = frozenset("""
a about after all also am an and any are as at be because been being but by can could did do does doing don't
for from had has have having he her here him his how i i'm i've if in into is it it's its just like me more most
my myself no not now of on once only or other our out over own really same she should so some such than that the
their them then there these they this those to too up very was we were what when where which while who why will
with would you your yours yes oh well lot much many get got go going one""".split())


class EvaluationStopped(Exception):
    """A stop signal arrived while evaluating; the caller decides what that means."""


@dataclass(frozen=True)
class Case:
    """One held-out row to answer: its persona, the conversation before the reference, and the prompt ids."""
    persona: tuple[str, ...]
    context: tuple[tuple[str, str], ...]   # (user, reply) exchanges before the last user turn
    user: str                              # the turn the reference answers
    reference: str
    prompt_ids: tuple[int, ...]


# ---------------------------------------------------------------- text metrics

def normalize(text: str) -> list[str]:
    """ParlAI's answer normalisation: lower case, no punctuation, no articles, split on whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def unigram_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction), normalize(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def content_words(text: str) -> set[str]:
    return {w for w in normalize(text) if w not in STOPWORDS and len(w) > 1}


def persona_overlap(reply: str, persona: Sequence[str]) -> float:
    """The largest share of one persona fact's content words that the reply uses (0..1)."""
    words = content_words(reply)
    shares = [len(words & fact) / len(fact) for fact in map(content_words, persona) if fact]
    return max(shares, default=0.0)


# ---------------------------------------------------------------- cases and prompts

def generation_cases(rows: Sequence[Row], tokenizer, max_prompt_tokens: int, limit: int) -> list[Case]:
    """The first `limit` held-out rows as prompts, encoded exactly as training encodes the conversation up to the
    reference's user turn; the oldest exchanges are dropped (the persona moving along) to fit."""
    cases = []
    for row in rows:
        if len(cases) >= limit:
            break
        prompt = TEMPLATE.encode_prompt(row, tokenizer, max_prompt_tokens)
        if prompt is not None:
            kept, ids = prompt
            user, reference = TEMPLATE.exchanges(row)[-1]
            cases.append(Case(row.persona, tuple(kept), user, reference, tuple(ids)))
    return cases


# ---------------------------------------------------------------- model passes

@contextmanager
def _quiet_eval(model):
    """Eval mode, no grad, and the RNG left as it was (a checkpoint's saved RNG state must stay the truth)."""
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def _base(model, use_base: bool):
    return model.disable_adapter() if use_base else nullcontext()


def reply_loss(model, examples: Sequence[dict], collator, batch_size: int, device,
               should_stop: Callable[[], Any] = lambda: False, use_base: bool = False) -> dict[str, float]:
    """Mean negative log-likelihood over every labelled token (Persona B's words and EOS), and its exp."""
    total, count = 0.0, 0
    with _quiet_eval(model), _base(model, use_base):
        for start in range(0, len(examples), batch_size):
            if should_stop():
                raise EvaluationStopped()
            batch = collator([dict(e) for e in examples[start:start + batch_size]])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            shifted = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       shifted.reshape(-1), ignore_index=IGNORE_INDEX,
                                                       reduction="sum")
            total += losses.item()
            count += int((shifted != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": count}


def generate_replies(model, tokenizer, cases: Sequence[Case], max_new_tokens: int, batch_size: int, device,
                     should_stop: Callable[[], Any] = lambda: False, use_base: bool = False) -> list[str]:
    """Greedy replies, left-padded in batches; each reply ends at EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    with _quiet_eval(model), _base(model, use_base):
        for start in range(0, len(cases), batch_size):
            if should_stop():
                raise EvaluationStopped()
            chunk = cases[start:start + batch_size]
            longest = max(len(c.prompt_ids) for c in chunk)
            ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for i, c in enumerate(chunk):
                ids[i, longest - len(c.prompt_ids):] = torch.tensor(c.prompt_ids)
                mask[i, longest - len(c.prompt_ids):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens, use_cache=True,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
            for row in out[:, longest:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return replies


def brief(result: dict) -> dict:
    """The headline figures of an evaluation, for a log line and status.json."""
    out = {}
    for who in ("base", "tuned"):
        for key, value in result.get(who, {}).items():
            if key != "tokens":
                out[f"{who}_{key}"] = value
    return out


# ---------------------------------------------------------------- persona consistency

def nli_labels(name: str, id2label: dict) -> tuple[int, int]:
    """The class ids of entailment and contradiction, found by name; ValueError (one line) when there are none."""
    labels = {int(i): str(label).lower() for i, label in id2label.items()}
    entail = next((i for i, l in labels.items() if l.startswith("entail")), None)
    contradict = next((i for i, l in labels.items() if l.startswith("contradict")), None)
    if entail is None or contradict is None:
        raise ValueError(f"NLI_MODEL={name!r}: its labels {sorted(labels.values())} have no 'entailment' and "
                         f"'contradiction'; use an NLI model (e.g. an MNLI-trained cross-encoder)")
    return entail, contradict


class NliJudge:
    """An off-the-shelf NLI classifier: premise = the reply, hypothesis = one persona fact."""

    def __init__(self, name: str, token: str | None, device: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name, token=token)
        # Kept on the CPU while training runs (it is outside the memory estimate); on the GPU only to judge.
        self.model = AutoModelForSequenceClassification.from_pretrained(name, token=token).eval()
        self.device = device
        self.entail, self.contradict = nli_labels(name, self.model.config.id2label)

    def verdicts(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[int]:
        """+1 entailment, -1 contradiction, 0 otherwise, for each (premise, hypothesis)."""
        out = []
        self.model.to(self.device)
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                enc = self.tokenizer([p for p, _ in chunk], [h for _, h in chunk], padding=True, truncation=True,
                                     max_length=256, return_tensors="pt").to(self.device)
                best = self.model(**enc).logits.argmax(-1).tolist()
                out += [1 if b == self.entail else -1 if b == self.contradict else 0 for b in best]
        self.model.to("cpu")
        return out


def consistency(replies: Sequence[str], cases: Sequence[Case], judge: NliJudge | None) -> dict[str, Any]:
    if judge is None:
        scores = [persona_overlap(r, c.persona) for r, c in zip(replies, cases)]
        return {"persona_overlap": round(sum(scores) / max(len(scores), 1), 4)}
    pairs = [(r, fact) for r, c in zip(replies, cases) for fact in c.persona]
    verdicts = iter(judge.verdicts(pairs))
    per_reply = [[next(verdicts) for _ in c.persona] for c in cases[:len(replies)]]
    n = max(len(per_reply), 1)
    return {"c_score": round(sum(map(sum, per_reply)) / n, 4),
            "entailed_share": round(sum(1 in v for v in per_reply) / n, 4),
            "contradicted_share": round(sum(-1 in v for v in per_reply) / n, 4)}


# ---------------------------------------------------------------- the whole evaluation

@dataclass
class Evaluator:
    """Held-out loss for base and tuned, and (with cases) greedy replies, F1, consistency and samples."""
    tokenizer: Any
    examples: Sequence[dict]
    cases: Sequence[Case]
    collator: Any
    batch_size: int
    max_new_tokens: int
    device: str
    judge: NliJudge | None = None
    method: str = "persona word overlap (proxy)"
    _base_result: dict | None = None

    def run(self, model, should_stop: Callable[[], Any] = lambda: False) -> dict[str, Any]:
        from .speed.kernels import eager

        with eager():   # compiled decoder layers (TORCH_COMPILE) run eagerly for no-grad loss and generation
            return self._run(model, should_stop)

    def _run(self, model, should_stop) -> dict[str, Any]:
        if self._base_result is None:   # the base never changes: once per process
            self._base_result = self._one(model, True, should_stop)
        tuned = self._one(model, False, should_stop)
        base = self._base_result
        result: dict[str, Any] = {
            "heldout_rows": len(self.examples), "generated_rows": len(self.cases),
            "consistency_method": self.method,
            "base": {k: v for k, v in base.items() if k != "replies"},
            "tuned": {k: v for k, v in tuned.items() if k != "replies"},
            "improved": tuned["loss"] < base["loss"],
        }
        if self.cases:
            result["reference"] = consistency([c.reference for c in self.cases], self.cases, self.judge)
            result["samples"] = [
                {"persona": list(c.persona), "context": [list(e) for e in c.context] + [[c.user, None]],
                 "reference": c.reference, "base_reply": b, "tuned_reply": t}
                for c, b, t in zip(self.cases[:SAMPLES_SHOWN], base["replies"], tuned["replies"])]
        return result

    def _one(self, model, use_base: bool, should_stop) -> dict[str, Any]:
        figures: dict[str, Any] = reply_loss(model, self.examples, self.collator, self.batch_size, self.device,
                                             should_stop, use_base)
        figures["replies"] = []
        if self.cases:
            replies = generate_replies(model, self.tokenizer, self.cases, self.max_new_tokens, self.batch_size,
                                       self.device, should_stop, use_base)
            figures["replies"] = replies
            figures["reply_f1"] = round(sum(unigram_f1(r, c.reference) for r, c in zip(replies, self.cases))
                                        / len(self.cases), 4)
            figures.update(consistency(replies, self.cases, self.judge))
        return figures


def build_evaluator(config, tokenizer, rows: Sequence[Row], examples: Sequence[dict], collator, device: str) -> Evaluator:
    cases = generation_cases(rows, tokenizer, config.max_seq_length - config.eval_max_new_tokens,
                             config.eval_generations)
    judge, method = None, "persona word overlap (proxy)"
    if config.nli_model and cases:
        judge = NliJudge(config.nli_model, config.hf_token or None, device)
        method = f"NLI C-score ({config.nli_model})"
    return Evaluator(tokenizer=tokenizer, examples=examples, cases=cases, collator=collator,
                     batch_size=config.per_device_eval_batch_size, max_new_tokens=config.eval_max_new_tokens,
                     device=device, judge=judge, method=method)
