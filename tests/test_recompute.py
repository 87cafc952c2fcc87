"""GRADIENT_CHECKPOINTING's modes recompute, they never change what is learned: through the job's Trainer on the
CPU, whole-layer, selective and offloaded recomputation train to the eager run's losses and adapter, bit for bit,
and each mode really runs as named. (Their memory and speed are measured on a GPU: bench/speed.py job-gc*.)"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import job.speed.recompute
from job.config import from_env
from job.speed.plan import plan


def sequences(n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 40 + 13 * (i % 5)
        ids = torch.randint(3, 1000, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


class OpCounter(TorchDispatchMode):
    """How many times each op runs: a recomputed op runs again in the backward pass, a saved one does not."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def train(tiny_model, tmp_path, setting: str) -> tuple[list[float], dict[str, torch.Tensor], collections.Counter]:
    """Three optimizer steps of the job's Trainer (LoRA dropout 0.1, as the seed) with GRADIENT_CHECKPOINTING."""
    import datasets

    from job.model import add_lora, load_base_model, load_tokenizer
    from job.speed.attention import data_collator
    from job.trainer import PersonaTrainer, training_arguments

    config = from_env({"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false", "LORA_TARGET_MODULES": "all-linear",
                       "GRADIENT_CHECKPOINTING": setting, "MAX_STEPS": "3", "LOGGING_STEPS": "1",
                       "OPTIM": "adamw_torch", "LEARNING_RATE": "1e-2", "PADDING_FREE": "true"})
    speed = plan(config, "cpu")
    assert speed.gradient_checkpointing == (setting != "false")
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    model = add_lora(config, load_base_model(config, tokenizer, "cpu", speed), tokenizer)
    with torch.no_grad():  # LoRA B starts at zero; give it values so every gradient path carries something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    args = training_arguments(config, tmp_path / setting, "cpu", False, speed)
    trainer = PersonaTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(sequences(12)),
                             data_collator=data_collator(speed, tokenizer), processing_class=tokenizer,
                             callbacks=job.speed.recompute.callbacks(speed.recompute))
    with OpCounter() as ops:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, ops.counts


@pytest.fixture(scope="module")
def eager(tiny_model, tmp_path_factory):
    return train(tiny_model, tmp_path_factory.mktemp("eager"), "false")


@pytest.mark.parametrize("setting", ["true", "selective", "offload"])
def test_each_recompute_mode_trains_to_the_eager_runs_losses_and_adapter_exactly(tiny_model, tmp_path, eager,
                                                                                monkeypatch, setting):
    decisions = []
    policy = job.speed.recompute.save_matmuls

    def watched(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        decisions.append((ctx.is_recompute, str(op), decision.name))
        return decision
    monkeypatch.setattr(job.speed.recompute, "save_matmuls", watched)
    offloaded = []
    to_host = job.speed.recompute.to_host

    def watched_offload(tensor):
        offloaded.append(tensor.shape)
        return to_host(tensor)
    monkeypatch.setattr(job.speed.recompute, "to_host", watched_offload)

    losses, adapter, ops = train(tiny_model, tmp_path, setting)

    assert losses == eager[0]
    assert adapter.keys() == eager[1].keys()
    assert all(torch.equal(adapter[n], eager[1][n]) for n in adapter), \
        [n for n in adapter if not torch.equal(adapter[n], eager[1][n])]
    matmuls = ("aten.mm.default", "bitsandbytes.gemm_4bit.default")
    eager_ops = eager[2]
    if setting == "selective":   # kept the matmuls, recomputed the rest (SiLU, norms, ...) in the backward
        assert {d for r, op, d in decisions if "mm" in op} == {"MUST_SAVE"}
        assert all(ops[m] == eager_ops[m] for m in matmuls), [(m, ops[m], eager_ops[m]) for m in matmuls]
        assert ops["aten.silu.default"] > eager_ops["aten.silu.default"]
    else:                        # whole layers: every op of the forward again, matmuls included
        assert not decisions
        assert all(ops[m] > eager_ops[m] for m in matmuls)
    assert bool(offloaded) == (setting == "offload")


def test_the_modes_resolve_from_the_setting():
    config = from_env({"GRADIENT_CHECKPOINTING": "selective"})
    assert plan(config, "cpu").recompute == "selective"
    assert plan(from_env({"GRADIENT_CHECKPOINTING": "true"}), "cpu").recompute == "layers"
    assert plan(from_env({"GRADIENT_CHECKPOINTING": "offload"}), "cpu").recompute == "offload"
    assert plan(from_env({}), "cpu").recompute == "" and not plan(from_env({}), "cpu").gradient_checkpointing
    for mode in ("layers", "selective", "offload"):   # JSON, as TrainingArguments is written out
        assert job.speed.recompute.checkpoint_kwargs(mode) == {"use_reentrant": False}
