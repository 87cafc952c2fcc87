"""A tiny random Llama and a tokenizer trained on the shipped sample data: for tests, the CPU demo and
the GPU end-to-end bench. Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

from .data import PromptTemplate

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "data" / "persona_sample.jsonl"


def _corpus(path: Path) -> list[str]:
    texts = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        texts += row["persona_b"] + row["dialogue"] + [row["reference"]]
    return texts + [f"{' '.join(PromptTemplate.MARKERS)} You are Persona B. Stay in character."]


def build_tokenizer(directory: str | Path, data: Path = SAMPLE_DATA, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(_corpus(data), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=4096)
    fast.save_pretrained(str(directory))
    return fast


def build_tiny_model(directory: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, initializer_range=0.15, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory
