"""Persona-chat rows -> checked rows -> a seeded sample split by conversation -> token ids with a loss mask.

The one prompt template lives here (`PromptTemplate`, used as `TEMPLATE`): it renders the text and encodes the
ids and loss mask for training, evaluation, the model card and any generation. The loss mask is ours because no
library masks multi-turn Llama-2 chat by speaker.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .config import Config

PERSONA_OPEN, PERSONA_CLOSE = "<persona_b>", "</persona_b>"
PERSONA_TOKENS = [PERSONA_OPEN, PERSONA_CLOSE]
SYSTEM_PROMPT = "You are Persona B. Stay in character and reply as the persona described below."
SPEAKERS = ("Persona A:", "Persona B:")
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset that cannot be used. The message is one line naming the dataset, row and field."""


@dataclass(frozen=True)
class Row:
    index: int            # 1-based position in the source (the line number of a .jsonl file)
    conv_id: str
    persona: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]   # (speaker "A"|"B", text), labels stripped
    reference: str


@dataclass(frozen=True)
class Splits:
    train: list[Row]
    eval: list[Row]

    def fingerprint(self) -> str:
        """What run.json records of the data, so that a restart on other rows is refused."""
        return dataset_fingerprint(self.train + self.eval)


def load_splits(config: Config) -> Splits:
    """DATASET's rows, each checked, then NUM_SAMPLES of them drawn and split by conversation."""
    rows = parse_rows(load_rows(config.dataset), config.dataset)
    splits = sample_and_split(rows, config.num_samples, config.eval_fraction, config.seed)
    if not splits.train:
        raise DataError(f"DATASET={config.dataset!r}: no training rows left after the eval split; "
                        f"lower EVAL_FRACTION or add rows")
    return splits


def is_local_dataset(dataset: str) -> bool:
    """A local file (an accepted suffix, or anything that exists there), else a Hub id."""
    path = Path(dataset)
    return path.suffix in LOCAL_SUFFIXES or path.exists()


def load_rows(dataset: str) -> list[dict[str, Any]]:
    """Rows as plain dicts, from the Hub or a local file, through the same `datasets` loader."""
    import datasets

    path = Path(dataset)
    if is_local_dataset(dataset):
        if not path.is_file():
            raise DataError(f"DATASET={dataset!r}: no such file; give a Hub id or a .jsonl/.json/.parquet file")
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"DATASET={dataset!r}: unsupported file type {path.suffix!r}; "
                            f"accepted: {', '.join(LOCAL_SUFFIXES)}")
        if not path.read_bytes().strip():
            raise DataError(f"DATASET={dataset!r}: no rows (the file is empty)")
        try:
            ds = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            detail = next(iter(str(exc).splitlines()), "")[:200]
            raise DataError(f"DATASET={dataset!r}: cannot read the file ({type(exc).__name__}"
                            f"{': ' + detail if detail else ''})") from None
    else:
        ds = datasets.load_dataset(dataset, split="train")
    return ds.to_list()


def parse_rows(raw: Sequence[dict[str, Any]], source: str) -> list[Row]:
    """Check every row; the first bad one stops the job with its row number and field."""
    if not raw:
        raise DataError(f"DATASET={source!r}: no rows")
    return [_parse_row(r, i + 1, source) for i, r in enumerate(raw)]


def _parse_row(r: Any, index: int, source: str) -> Row:
    where = f"DATASET={source!r} row {index}"
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected an object with persona_b, dialogue, reference; got {type(r).__name__}")
    for key in ("persona_b", "dialogue", "reference"):
        if key not in r or r[key] is None:
            raise DataError(f"{where}: missing field {key!r} (needed: persona_b, dialogue, reference; "
                            f"optional conv_id)")
    persona, dialogue, reference = r["persona_b"], r["dialogue"], r["reference"]
    if not isinstance(persona, list) or not persona or not all(isinstance(p, str) and p.strip() for p in persona):
        raise DataError(f"{where}: field 'persona_b' must be a non-empty list of non-empty strings; "
                        f"got {_short(persona)}")
    if not isinstance(dialogue, list) or not dialogue:
        raise DataError(f"{where}: field 'dialogue' must be a non-empty list of turns; got {_short(dialogue)}")
    turns = []
    for t, turn in enumerate(dialogue):
        if not isinstance(turn, str) or not turn.startswith(SPEAKERS) or not turn.split(":", 1)[1].strip():
            raise DataError(f"{where}: field 'dialogue' turn {t + 1} must be a string starting with "
                            f"'Persona A:' or 'Persona B:' followed by text; got {_short(turn)}")
        turns.append(("A" if turn.startswith(SPEAKERS[0]) else "B", turn.split(":", 1)[1].strip()))
    if not isinstance(reference, str) or not reference.strip():
        raise DataError(f"{where}: field 'reference' must be a non-empty string; got {_short(reference)}")
    conv_id = r.get("conv_id")
    if conv_id is not None and not isinstance(conv_id, (str, int)):
        raise DataError(f"{where}: field 'conv_id' must be a string or number; got {_short(conv_id)}")
    if conv_id is None:
        # Rows are prefixes of one conversation: same persona, same opening turn.
        conv_id = hashlib.sha1(json.dumps([persona, dialogue[0]]).encode()).hexdigest()[:12]
    return Row(index=index, conv_id=str(conv_id), persona=tuple(p.strip() for p in persona),
               turns=tuple(turns), reference=reference.strip())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def sample_and_split(rows: list[Row], num_samples: int, eval_fraction: float, seed: int) -> Splits:
    """Shuffle with the seed, take NUM_SAMPLES, hold out whole conversations for eval."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    if num_samples:
        order = order[:num_samples]
    if eval_fraction <= 0:
        return Splits(train=order, eval=[])
    conversations = sorted({r.conv_id for r in order})
    random.Random(seed + 1).shuffle(conversations)
    n_eval = max(1, round(len(conversations) * eval_fraction)) if len(conversations) > 1 else 0
    held_out = set(conversations[:n_eval])
    return Splits(train=[r for r in order if r.conv_id not in held_out],
                  eval=[r for r in order if r.conv_id in held_out])


class PromptTemplate:
    """The Llama-2 chat template with the persona in the system block, between the persona tokens. It renders
    a conversation as text and encodes it as token ids with the loss mask, so that what is trained, what is
    evaluated and what the model card shows can never drift apart."""

    INST, INST_END, SYS, SYS_END = "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"
    MARKERS = (INST, SYS, SYS_END, INST_END)   # the template's own words, in the order they appear

    def exchanges(self, row: Row) -> list[tuple[str, str]]:
        """(user text, Persona B reply) pairs; the reference is the last reply. Same-speaker runs are joined."""
        merged: list[list[str]] = []
        for speaker, text in list(row.turns) + [("B", row.reference)]:
            if merged and merged[-1][0] == speaker:
                merged[-1][1] += "\n" + text
            else:
                merged.append([speaker, text])
        if merged[0][0] == "B":
            merged.insert(0, ["A", ""])
        return [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged) - 1, 2)]

    def system_block(self, persona: Sequence[str]) -> str:
        return f"{self.SYS}\n{SYSTEM_PROMPT}\n{PERSONA_OPEN}{' '.join(persona)}{PERSONA_CLOSE}\n{self.SYS_END}\n\n"

    def instruction(self, persona: Sequence[str], user: str, first: bool) -> str:
        """One user turn; the first exchange of a conversation also carries the system block."""
        return f"{self.INST} {self.system_block(persona) if first else ''}{user} {self.INST_END}"

    def render(self, persona: Sequence[str], exchanges: Sequence[tuple[str, str]],
               next_user: str | None = None) -> str:
        """The Llama-2 chat text of a conversation (BOS/EOS written as <s> and </s>), for docs and generation."""
        turns = [*exchanges, *([(next_user, None)] if next_user is not None else [])]
        return "".join(f"<s>{self.instruction(persona, user, i == 0)}"
                       + (f" {reply} </s>" if reply is not None else "") for i, (user, reply) in enumerate(turns))

    def encode(self, row: Row, tokenizer, max_length: int, known: dict | None = None) -> dict[str, list[int]] | None:
        """Token ids and labels for training: only Persona B's replies and their EOS are trained.

        Each exchange is encoded as Meta's reference code does (BOS + "[INST] user [/INST] reply" + EOS).
        When too long, the oldest exchanges are dropped (the persona moves to the first one kept); an
        example whose last exchange alone does not fit is skipped (returns None), never cut through the reply.
        """
        fitted = self._fit(row.persona, self.exchanges(row), tokenizer, max_length, known)
        return None if fitted is None else {"input_ids": fitted[1], "labels": fitted[2]}

    def encode_all(self, rows: Sequence[Row], tokenizer, max_length: int) -> list[dict[str, list[int]] | None]:
        """`encode` of each row, the same ids and labels, with the tokenizer called once for every exchange's text
        as a batch, not once per exchange: a call's own overhead in transformers was most of the encoding's time,
        about half a second for the seed's 1000 rows (an exchange cut to fit, rarely, is encoded on its own)."""
        texts = [f"{self.instruction(row.persona, user, i == 0)} {reply}"
                 for row in rows for i, (user, reply) in enumerate(self.exchanges(row))]
        known = {}
        if texts:
            batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            known = dict(zip(texts, zip(batch["input_ids"], batch["offset_mapping"])))
        return [self.encode(row, tokenizer, max_length, known) for row in rows]

    def encode_prompt(self, row: Row, tokenizer, max_length: int) -> tuple[list[tuple[str, str]], list[int]] | None:
        """The conversation up to the reference's user turn, encoded exactly as training encodes it, for a
        generated reply: (the exchanges kept before that turn, the prompt's ids). Old exchanges are dropped to fit,
        as in `encode`; None if the last user turn alone does not fit."""
        *context, (user, _) = self.exchanges(row)
        fitted = self._fit(row.persona, [*context, (user, None)], tokenizer, max_length)
        return None if fitted is None else (context[fitted[0]:], fitted[1])

    def _fit(self, persona: Sequence[str], exchanges: Sequence[tuple[str, str | None]], tokenizer,
             max_length: int, known: dict | None = None) -> tuple[int, list[int], list[int]] | None:
        """(how many old exchanges were dropped, ids, labels) of the longest tail of `exchanges` that fits.
        `known`: texts already encoded (encode_all), text -> (ids, offsets)."""
        for start in range(len(exchanges)):
            ids, labels = [], []
            for i, (user, reply) in enumerate(exchanges[start:]):
                e_ids, e_labels = self._encode_exchange(tokenizer, self.instruction(persona, user, i == 0), reply,
                                                        known)
                ids += e_ids
                labels += e_labels
            if len(ids) <= max_length:
                return start, ids, labels
        return None

    @staticmethod
    def _encode_exchange(tokenizer, prompt: str, reply: str | None,
                         known: dict | None = None) -> tuple[list[int], list[int]]:
        """BOS, the prompt, the reply and EOS, labels on the reply's tokens and EOS; a reply of None is the open
        turn a generation answers (BOS and the prompt, nothing trained)."""
        if reply is None:
            ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            return ids, [IGNORE_INDEX] * len(ids)
        text = f"{prompt} {reply}"
        if known and text in known:
            tokens, offsets = known[text]
        else:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            tokens, offsets = enc["input_ids"], enc["offset_mapping"]
        reply_start = len(prompt) + 1
        ids = [tokenizer.bos_token_id] + list(tokens) + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX]
        for token, (begin, end) in zip(tokens, offsets):
            labels.append(token if end > reply_start else IGNORE_INDEX)
        labels.append(tokenizer.eos_token_id)
        return ids, labels


TEMPLATE = PromptTemplate()


def encode_rows(rows: Sequence[Row], tokenizer, max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """Encoded examples and the number skipped for length."""
    encoded = TEMPLATE.encode_all(rows, tokenizer, max_length)
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


def dataset_fingerprint(rows: Sequence[Row]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.conv_id, r.persona, r.turns, r.reference]).encode())
    return h.hexdigest()[:16]
