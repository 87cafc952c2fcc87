"""After the run: is the tuned adapter a better Persona B than the base? Held-out reply loss and perplexity,
F1 of greedy replies, persona consistency, sample replies, the loss curve, and a publish gate on the result."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CPU_SETTINGS, ROOT, SAMPLE_DATA, job_env, run_job

from job.evaluate import (NliJudge, consistency, generate_replies, generation_cases, normalize, persona_overlap,
                          reply_loss, unigram_f1)


# ---------------------------------------------------------------- the text metrics, by hand

def test_unigram_f1_follows_parlai_normalisation():
    assert normalize("The DOGS, and a cat!") == ["dogs", "and", "cat"]
    assert unigram_f1("I love the dogs!", "i love dogs") == 1.0
    # pred: i have two cats (4), ref: i have one cat and two dogs (7); common: i, have, two = 3.
    assert unigram_f1("I have two cats", "I have one cat and two dogs") == pytest.approx(2 * (3 / 4) * (3 / 7) / (3 / 4 + 3 / 7))
    assert unigram_f1("", "anything") == 0.0 and unigram_f1("nothing shared", "at all here") == 0.0


def test_persona_overlap_scores_the_best_matching_fact():
    persona = ["I keep bees on my roof.", "I work as a night nurse."]
    assert persona_overlap("We keep the bees up on the roof!", persona) == 1.0  # keep, bees, roof: all of fact 1
    assert persona_overlap("My bees live on the roof!", persona) == pytest.approx(2 / 3)
    assert persona_overlap("I work nights.", persona) == pytest.approx(1 / 3)    # work of work/night/nurse
    assert persona_overlap("Hello there, how are you?", persona) == 0.0


# ---------------------------------------------------------------- the model passes, on the tiny model

@pytest.fixture(scope="module")
def tiny_parts(tiny_model):
    from job.config import from_env
    from job.data import encode_rows, load_rows, parse_rows
    from job.model import add_lora, load_base_model, load_tokenizer

    config = from_env({**CPU_SETTINGS, "BASE_MODEL": str(tiny_model), "LORA_TARGET_MODULES": "q_proj,v_proj"})
    tokenizer = load_tokenizer(config)
    rows = parse_rows(load_rows(str(SAMPLE_DATA)), str(SAMPLE_DATA))[:12]
    torch.manual_seed(0)
    model = add_lora(config, load_base_model(config, tokenizer, "cpu"), tokenizer)
    with torch.no_grad():   # an adapter that changes the model, so base and tuned differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    examples, _ = encode_rows(rows, tokenizer, 384)
    return config, tokenizer, rows, model, examples


def test_generation_prompts_are_the_training_encoding_up_to_the_reply(tiny_parts):
    from job.data import TEMPLATE
    config, tokenizer, rows, _, _ = tiny_parts
    cases = generation_cases(rows, tokenizer, 384, limit=12)
    assert len(cases) == 12
    for row, case in zip(rows, cases):
        trained = TEMPLATE.encode(row, tokenizer, 384)["input_ids"]
        prompt = list(case.prompt_ids)
        assert trained[:len(prompt)] == prompt
        # What follows the prompt in training is the reference reply and EOS, nothing else.
        reply = trained[len(prompt):]
        assert reply[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(reply[:-1]).strip() == row.reference
    # A prompt that must fit a shorter budget drops old exchanges but keeps the persona and the last user turn.
    longest = max(cases, key=lambda c: len(c.context))
    assert len(longest.context) >= 2
    row = rows[cases.index(longest)]
    short = generation_cases([row], tokenizer, len(longest.prompt_ids) - 1, limit=1)[0]
    assert len(short.prompt_ids) < len(longest.prompt_ids) and short.context == longest.context[1:]
    assert tokenizer.convert_tokens_to_ids("<persona_b>") in short.prompt_ids and short.user == longest.user


def test_reply_loss_is_the_token_weighted_nll_of_the_labelled_tokens(tiny_parts):
    from job.speed.attention import data_collator
    from job.speed.plan import plan
    config, tokenizer, _, model, examples = tiny_parts
    collator = data_collator(plan(config, "cpu", model.config), tokenizer)
    got = reply_loss(model, examples, collator, batch_size=4, device="cpu")

    total, count = 0.0, 0    # one example at a time, no padding: the definition
    model.eval()
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(e["labels"][1:])
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, abs=1e-4)
    assert got["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-3)
    base = reply_loss(model, examples, collator, batch_size=4, device="cpu", use_base=True)
    assert abs(base["loss"] - got["loss"]) > 1e-3    # the adapter is really switched off for the base


def test_batched_greedy_replies_equal_one_at_a_time_generation(tiny_parts):
    _, tokenizer, rows, model, _ = tiny_parts
    cases = generation_cases(rows, tokenizer, 384, limit=6)   # prompts of different lengths: left padding
    assert len({len(c.prompt_ids) for c in cases}) > 1
    batched = generate_replies(model, tokenizer, cases, max_new_tokens=10, batch_size=4, device="cpu")
    single = [generate_replies(model, tokenizer, [c], max_new_tokens=10, batch_size=1, device="cpu")[0]
              for c in cases]
    assert batched == single and any(batched)
    base = generate_replies(model, tokenizer, cases, max_new_tokens=10, batch_size=4, device="cpu", use_base=True)
    assert base != batched


def test_evaluation_leaves_the_rng_and_training_mode_as_they_were(tiny_parts):
    _, tokenizer, rows, model, _ = tiny_parts
    model.train()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    generate_replies(model, tokenizer, generation_cases(rows, tokenizer, 384, 2), 4, 2, "cpu")
    assert torch.equal(torch.rand(3), expected) and model.training


def _nli_model(path, tokenizer_dir, verdict: str, labels=("contradiction", "neutral", "entailment")):
    """A tiny BERT classifier that always answers `verdict`: zero weights, a bias on one label."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, id2label=dict(enumerate(labels)),
                        label2id={l: i for i, l in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([10.0 if l == verdict else 0.0 for l in labels]))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_nli_consistency_is_the_c_score_of_the_verdicts(tiny_parts, tiny_model, tmp_path):
    _, tokenizer, rows, _, _ = tiny_parts
    cases = generation_cases(rows, tokenizer, 384, limit=4)
    replies = ["I like it."] * len(cases)
    facts = sum(len(c.persona) for c in cases) / len(cases)
    agree = NliJudge(str(_nli_model(tmp_path / "yes", tiny_model, "entailment")), None, "cpu")
    assert consistency(replies, cases, agree) == {"c_score": pytest.approx(facts), "entailed_share": 1.0,
                                                  "contradicted_share": 0.0}
    # Labels in another order are found by name, not by position.
    deny = NliJudge(str(_nli_model(tmp_path / "no", tiny_model, "contradiction",
                                   labels=("entailment", "contradiction", "neutral"))), None, "cpu")
    assert consistency(replies, cases, deny) == {"c_score": pytest.approx(-facts), "entailed_share": 0.0,
                                                 "contradicted_share": 1.0}
    with pytest.raises(ValueError, match="NLI_MODEL=.*no 'entailment' and 'contradiction'"):
        NliJudge(str(_nli_model(tmp_path / "sentiment", tiny_model, "good", labels=("bad", "good", "meh"))),
                 None, "cpu")


# ---------------------------------------------------------------- the job, end to end

def test_a_trained_adapter_beats_the_base_on_held_out_conversations(cpu_job, tmp_path, tiny_model):
    nli = _nli_model(tmp_path / "nli", tiny_model, "neutral")
    env = cpu_job(MAX_STEPS="16", EVAL_GENERATIONS="6", NLI_MODEL=str(nli))
    result = run_job("train", env=env)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "training_summary.json").read_text())
    evaluation = summary["evaluation"]
    assert evaluation["tuned"]["loss"] < evaluation["base"]["loss"] - 0.2, evaluation   # it learned
    assert evaluation["improved"] is True and evaluation["heldout_rows"] == summary["eval_rows"]
    assert evaluation["generated_rows"] == 6 and evaluation["consistency_method"].startswith("NLI C-score")
    for who in ("base", "tuned"):
        assert {"loss", "perplexity", "reply_f1", "c_score", "entailed_share", "contradicted_share"} <= \
            set(evaluation[who])
        assert evaluation[who]["c_score"] == 0.0      # the judge always says neutral
        assert 0.0 <= evaluation[who]["reply_f1"] <= 1.0
    assert len(evaluation["samples"]) == 5
    assert set(evaluation["samples"][0]) == {"persona", "context", "reference", "base_reply", "tuned_reply"}
    logged = result.events("evaluation")[-1]
    assert logged["tuned_loss"] == evaluation["tuned"]["loss"] and logged["base_loss"] == evaluation["base"]["loss"]
    # What evaluation cost is in its events (bench/e2e_race.py reports it apart from the training's time).
    assert logged["seconds"] > 0
    assert all(e["seconds"] > 0 for e in result.events("eval")) and result.events("eval")

    # The card shows the comparison, the replies and the curve; the curve is a real picture of the losses.
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "| held-out reply loss (lower is better) |" in card
    assert f"{evaluation['tuned']['loss']:.4f}" in card and "### Sample replies" in card
    assert "![Train and eval loss by step](loss_curve.png)" in card
    from PIL import Image
    image = Image.open(out / "loss_curve.png")
    assert image.format == "PNG" and image.size[0] >= 600
    assert len(set(image.convert("L").getdata())) > 20        # lines and text, not a blank canvas
    # ... and all of it is committed with the final adapter.
    final = next((tmp_path / "store").glob("*/final"))
    assert {"loss_curve.png", "training_summary.json", "README.md"} <= {p.name for p in final.iterdir()}
    status = json.loads(run_job("status", "--json", env=env).stdout)
    assert status["evaluation"]["tuned_loss"] == evaluation["tuned"]["loss"]


def test_evaluating_at_every_checkpoint_stores_it_and_does_not_change_the_training(cpu_job, tmp_path,
                                                                                    uninterrupted):
    from safetensors.torch import load_file

    evaluated = run_job("train", env=cpu_job(EVAL_AT_CHECKPOINTS="true", SAVE_TOTAL_LIMIT="5"))
    assert evaluated.returncode == 0, evaluated.stderr
    steps = [e["step"] for e in evaluated.events("evaluation") if "step" in e and "base_loss" in e]
    assert steps == [4, 8, 12, 12]          # every checkpoint, then the final one
    for step in (4, 8, 12):
        folder = next((tmp_path / "store").glob(f"*/checkpoints/step-{step:08d}"))
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert "evaluation.json" in {f["path"] if isinstance(f, dict) else f for f in manifest["files"]}
        assert json.loads((folder / "evaluation.json").read_text())["step"] == step
    # The same settings without EVAL_AT_CHECKPOINTS: the session's uninterrupted run (conftest.py).
    a, b = uninterrupted, load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_during_the_final_evaluation_costs_no_training(cpu_job):
    env = cpu_job(MAX_STEPS="6", SAVE_STEPS="50", EVAL_GENERATIONS="64", EVAL_MAX_NEW_TOKENS="64",
                  PER_DEVICE_EVAL_BATCH_SIZE="1")
    proc = subprocess.Popen([sys.executable, "-m", "job", "train"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if '"event": "evaluation"' in line:     # the final evaluation has begun
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 75
    again = run_job("train", env=env)
    assert again.returncode == 0, again.stderr
    assert again.events("progress") == []      # not one step trained again
    assert [e["step"] for e in again.events("resume")] == [6]


# ---------------------------------------------------------------- the publish gate

REPO = "alice/persona-adapter"


def _run_commits(hub):
    """The job's commits on the repo's main branch; none while the repo does not exist."""
    if REPO not in hub.repos:
        return []
    return [c for c in hub.commits(REPO, "main") if c["message"].startswith("persona-qlora run ")]


def _hub_env(hub, settings):
    settings.pop("HF_HUB_OFFLINE")
    return hub.subprocess_env(hf_home=settings["HF_HOME"], token=settings["HF_TOKEN"], base=settings)


def test_the_publish_gate_refuses_an_adapter_no_better_than_the_base(cpu_job, hub_server):
    hub = hub_server()

    def env(**overrides):
        return _hub_env(hub, cpu_job(**{"MAX_STEPS": "4", "HUB_MODEL_ID": REPO, "HF_TOKEN": "hf_alice_write",
                                        "PUBLISH_ONLY_IF_IMPROVED": "true", **overrides}))

    still = run_job("train", env=env(LEARNING_RATE="1e-12"))     # trains, but changes nothing that shows
    assert still.returncode == 2
    line = still.stderr.strip().splitlines()[-1]
    assert line.startswith("error: PUBLISH_ONLY_IF_IMPROVED=true: the tuned adapter's held-out reply loss") and \
        "is not below the base model's" in line
    assert "hf_alice_write" not in still.stdout + still.stderr
    assert hub.count("preupload") == hub.count("commit") == 0 and _run_commits(hub) == []
    status = json.loads(run_job("status", "--json", env=env(LEARNING_RATE="1e-12")).stdout)
    assert status["phase"] == "failed" and "not below" in status["error"]
    # The user decides to push it anyway: same run, gate off, nothing retrained.
    forced = run_job("publish", env=env(LEARNING_RATE="1e-12", PUBLISH_ONLY_IF_IMPROVED="false"))
    assert forced.returncode == 0, forced.stderr
    assert len(_run_commits(hub)) == 1
    status = json.loads(run_job("status", "--json", env=env(LEARNING_RATE="1e-12")).stdout)
    assert status["phase"] == "done" and "error" not in status     # the refusal is history, not the state


def test_the_publish_gate_lets_a_better_adapter_through(cpu_job, hub_server):
    hub = hub_server()
    settings = _hub_env(hub, cpu_job(MAX_STEPS="8", HUB_MODEL_ID=REPO, HF_TOKEN="hf_alice_write",
                                     PUBLISH_ONLY_IF_IMPROVED="true"))
    result = run_job("train", env=settings)
    assert result.returncode == 0, result.stderr
    files = hub.files(REPO)
    assert "## Evaluation" in files["README.md"].decode()
    assert "](loss_curve.png)" in files["README.md"].decode()
    assert files["loss_curve.png"] == (Path(settings["OUTPUT_DIR"]) / "loss_curve.png").read_bytes()  # the card's picture


def test_the_publish_gate_needs_a_held_out_set():
    result = run_job("config", env=job_env(PUBLISH_ONLY_IF_IMPROVED="true", EVAL_FRACTION="0"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: PUBLISH_ONLY_IF_IMPROVED=true needs held-out conversations to compare on; set EVAL_FRACTION > 0 "
        "(e.g. 0.05) or PUBLISH_ONLY_IF_IMPROVED=false"]


def test_an_nli_model_without_nli_labels_is_refused_before_training(cpu_job, tmp_path, tiny_model):
    sentiment = _nli_model(tmp_path / "sentiment", tiny_model, "good", labels=("bad", "good", "meh"))
    result = run_job("train", env=cpu_job(NLI_MODEL=str(sentiment)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: NLI_MODEL={str(sentiment)!r}: its labels ['bad', 'good', 'meh'] have no 'entailment' and "
        f"'contradiction'; use an NLI model (e.g. an MNLI-trained cross-encoder)"]
    assert not result.events("model"), "refused in preflight, before the base model is loaded"
