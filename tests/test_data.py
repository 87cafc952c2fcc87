"""Persona rows become prompts in one template, and only Persona B's words and EOS are trained."""
import json

import pytest

from conftest import SAMPLE_DATA, run_job
from job.config import Config
from job.data import (IGNORE_INDEX, PERSONA_CLOSE, PERSONA_OPEN, TEMPLATE, DataError, load_rows, parse_rows,
                      sample_and_split)
from job.model import load_tokenizer

KNOWN_ROW = {
    "conv_id": "k1",
    "persona_b": ["I keep bees.", "I live on a boat."],
    "dialogue": ["Persona A: Hi there, what do you do for fun?",
                 "Persona B: I look after my bees most mornings.",
                 "Persona A: Bees! Where do you keep them?"],
    "reference": "On the roof of my boat, believe it or not.",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(Config(base_model=str(tiny_model)))


def sample_rows():
    return parse_rows([json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()], str(SAMPLE_DATA))


def labelled_runs(example):
    """Contiguous runs of trained positions, as lists of token ids."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a label must be the token at its own position (the model shifts)"
            current.append(token)
    return runs + ([current] if current else [])


def test_known_row_trains_exactly_persona_b_replies_and_their_eos(tokenizer):
    row = parse_rows([KNOWN_ROW], "inline")[0]
    example = TEMPLATE.encode(row, tokenizer, max_length=1024)
    ids = example["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and example["labels"][0] == IGNORE_INDEX
    runs = labelled_runs(example)
    replies = ["I look after my bees most mornings.", "On the roof of my boat, believe it or not."]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(run[:-1]).strip() == reply
    # Nothing else is trained: not the persona, not A's turns, not the markers or the [INST] frame.
    untrained = tokenizer.decode([t for t, l in zip(ids, example["labels"]) if l == IGNORE_INDEX])
    for text in ["I keep bees.", "what do you do for fun", "Where do you keep them", "[INST]", "[/INST]"]:
        assert text in untrained
    # The persona markers are single added tokens, once each, untrained.
    for marker in (PERSONA_OPEN, PERSONA_CLOSE):
        marker_id = tokenizer.convert_tokens_to_ids(marker)
        assert ids.count(marker_id) == 1
        assert example["labels"][ids.index(marker_id)] == IGNORE_INDEX
    # Speaker labels are gone from the text the model sees.
    assert "Persona A" not in tokenizer.decode(ids) and "Persona B:" not in tokenizer.decode(ids)


def test_the_one_template_is_llama2_chat_with_the_persona_marked():
    row = parse_rows([KNOWN_ROW], "inline")[0]
    text = TEMPLATE.render(row.persona, [("Hi there, what do you do for fun?", "I look after my bees most mornings.")],
                           next_user="Bees! Where do you keep them?")
    assert text.startswith("<s>[INST] <<SYS>>\n")
    assert f"{PERSONA_OPEN}I keep bees. I live on a boat.{PERSONA_CLOSE}\n<</SYS>>\n\n" in text
    assert text.endswith("[/INST] I look after my bees most mornings. </s><s>[INST] Bees! Where do you keep them? [/INST]")


def test_long_rows_lose_old_turns_never_the_reply(tokenizer):
    rows = sample_rows()
    row = max(rows, key=lambda r: len(r.turns))
    full = TEMPLATE.encode(row, tokenizer, max_length=4096)
    cut = TEMPLATE.encode(row, tokenizer, max_length=len(full["input_ids"]) - 1)
    assert cut is not None and len(cut["input_ids"]) < len(full["input_ids"])
    assert labelled_runs(cut)[-1] == labelled_runs(full)[-1], "the reference reply is kept whole"
    assert cut["input_ids"].count(tokenizer.convert_tokens_to_ids(PERSONA_OPEN)) == 1, "the persona is kept"
    assert TEMPLATE.encode(row, tokenizer, max_length=8) is None


def test_sample_is_seeded_and_eval_holds_out_whole_conversations():
    rows = sample_rows()
    a = sample_and_split(rows, num_samples=200, eval_fraction=0.1, seed=42)
    b = sample_and_split(rows, num_samples=200, eval_fraction=0.1, seed=42)
    c = sample_and_split(rows, num_samples=200, eval_fraction=0.1, seed=7)
    assert [r.index for r in a.train] == [r.index for r in b.train]
    assert [r.index for r in a.train] != [r.index for r in c.train]
    assert len(a.train) + len(a.eval) == 200 and a.eval
    assert not {r.conv_id for r in a.train} & {r.conv_id for r in a.eval}
    everything = sample_and_split(rows, num_samples=0, eval_fraction=0.0, seed=42)
    assert len(everything.train) == len(rows) and not everything.eval


def test_rows_without_conv_id_never_split_a_conversation():
    # Without conv_id, rows are grouped by persona and opening turn: a conversation is never cut in two
    # (two conversations with the same persona and greeting may share a group, which only errs safe).
    raw = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()]
    with_ids = parse_rows(raw, "x")
    without = {r.index: r.conv_id for r in parse_rows([{k: v for k, v in r.items() if k != "conv_id"} for r in raw], "x")}
    for conv in {r.conv_id for r in with_ids}:
        assert len({without[r.index] for r in with_ids if r.conv_id == conv}) == 1
    assert len(set(without.values())) >= 0.8 * len({r.conv_id for r in with_ids})


def test_local_jsonl_json_and_parquet_load_alike(tmp_path):
    import pandas as pd
    raw = load_rows(str(SAMPLE_DATA))
    pd.DataFrame(raw).to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "rows.json").write_text(json.dumps(raw))
    assert load_rows(str(tmp_path / "rows.parquet")) == raw
    assert load_rows(str(tmp_path / "rows.json")) == raw
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        (tmp_path / "rows.csv").write_text("a,b\n")
        load_rows(str(tmp_path / "rows.csv"))
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("change,expect", [
    (lambda r: r.pop("reference"), "row 3: missing field 'reference'"),
    (lambda r: r.update(persona_b="I like cats."), "row 3: field 'persona_b' must be a non-empty list"),
    (lambda r: r.update(dialogue=[]), "row 3: field 'dialogue' must be a non-empty list of turns; got []"),
    (lambda r: r.update(dialogue=["Hello there"]), "row 3: field 'dialogue' turn 1 must be a string starting with"),
    (lambda r: r.update(reference=7), "row 3: field 'reference' must be a non-empty string; got 7"),
])
def test_a_malformed_row_stops_the_job_before_training(cpu_job, tmp_path, change, expect):
    rows = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()][:40]
    change(rows[2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run_job("train", env=cpu_job(DATASET=str(bad)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and str(bad) in lines[0], lines
    assert not result.events("model"), "preflight stops the job before the model is loaded"


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n")])
def test_a_dataset_without_rows_stops_the_job_with_one_line(cpu_job, tmp_path, name, content):
    empty = tmp_path / name
    empty.write_text(content)
    result = run_job("train", env=cpu_job(DATASET=str(empty)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: DATASET={str(empty)!r}: no rows"), lines
    assert "Traceback" not in result.stderr


def test_rows_encoded_as_one_batch_are_those_encoded_one_by_one(tokenizer):
    """encode_rows calls the tokenizer once for every exchange's text (encode_all); what it gives must be what
    `encode` gives row by row, cut rows (the oldest exchanges dropped to fit) and skipped rows included."""
    from job.data import encode_rows

    rows = sample_rows()
    lengths = sorted(len(e["input_ids"]) for e in (TEMPLATE.encode(r, tokenizer, 4096) for r in rows))
    max_length = lengths[len(lengths) // 2]   # half the rows need their oldest exchanges dropped, or are skipped
    one_by_one = [TEMPLATE.encode(r, tokenizer, max_length) for r in rows]
    calls = []
    real = type(tokenizer).__call__

    def counted(self, text, *args, **kwargs):
        calls.append(text)
        return real(self, text, *args, **kwargs)

    type(tokenizer).__call__ = counted
    try:
        batched, skipped = encode_rows(rows, tokenizer, max_length)
        cuts = len(calls)
        calls.clear()
        uncut, _ = encode_rows(rows, tokenizer, 4096)
    finally:
        type(tokenizer).__call__ = real
    assert batched == [e for e in one_by_one if e is not None] and skipped == one_by_one.count(None)
    assert any(e is not None and len(e["input_ids"]) < len(full["input_ids"])
               for e, full in zip(one_by_one, (TEMPLATE.encode(r, tokenizer, 4096) for r in rows))), "no row was cut"
    assert cuts > 1   # a cut row's exchanges, its persona moved, are encoded on their own
    assert uncut == [TEMPLATE.encode(r, tokenizer, 4096) for r in rows]
    assert len(calls) == 1 and isinstance(calls[0], list), "rows that fit take one call for all their exchanges"
