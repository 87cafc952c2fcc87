"""The training thread's per-step work outside the model: the batch-4 step is bound by the host, and each read of a
GPU value on the host waits for the GPU. The job counts tokens without such a read, copies batches to the GPU
without waiting, and does not check every step's loss on the host; what it reports stays the same."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from job.config import from_env
from job.speed.attention import data_collator
from job.speed.plan import SpeedPlan
from job.trainer import PersonaTrainer, training_arguments

PLAN = SpeedPlan(padding_free=True, liger_kernel=False, tf32=False, gradient_checkpointing=False)


def batch(padding_free: bool):
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 500, (n,), generator=gen).tolist()} for n in (37, 52, 41, 60)]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    tokenizer = SimpleNamespace(pad_token_id=0, padding_side="right", model_input_names=["input_ids"])
    if padding_free:
        return data_collator(PLAN, tokenizer)(rows)
    ids = [torch.tensor(r["input_ids"]) for r in rows]
    return {"input_ids": torch.nn.utils.rnn.pad_sequence(ids, batch_first=True),
            "attention_mask": torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)}


def counting_trainer(tmp_path):
    """A PersonaTrainer's token counting, without a model (the method needs only args, state, processing_class)."""
    args = training_arguments(from_env({"REQUIRE_GPU": "false"}), tmp_path, "cpu", False, PLAN)
    trainer = PersonaTrainer.__new__(PersonaTrainer)
    trainer.args, trainer.state = args, SimpleNamespace(num_input_tokens_seen=0)
    trainer.processing_class = SimpleNamespace(pad_token_id=0)
    trainer.model = SimpleNamespace(main_input_name="input_ids")
    trainer.accelerator = SimpleNamespace(gather=lambda t: t)
    return trainer


def test_a_padding_free_batch_is_counted_without_reading_the_gpu(tmp_path, monkeypatch):
    trainer = counting_trainer(tmp_path)
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self) or item(self))
    pf = batch(padding_free=True)
    trainer._track_num_input_tokens(pf)
    assert trainer.state.num_input_tokens_seen == 37 + 52 + 41 + 60 and not reads
    # the Trainer's own count (on the device, read back) agrees
    from transformers import Trainer
    Trainer._track_num_input_tokens(trainer, pf)
    assert trainer.state.num_input_tokens_seen == 2 * (37 + 52 + 41 + 60) and reads


def test_a_padded_batch_is_still_counted_by_its_mask(tmp_path):
    trainer = counting_trainer(tmp_path)
    trainer._track_num_input_tokens(batch(padding_free=False))
    assert trainer.state.num_input_tokens_seen == 37 + 52 + 41 + 60


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_no_per_step_host_check_of_the_loss_and_batches_are_queued_to_the_gpu(tmp_path, device, monkeypatch):
    if device == "cuda":   # TrainingArguments asks the device only for what these settings do not touch
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = training_arguments(from_env({"REQUIRE_GPU": "false"}), tmp_path, device, False, PLAN)
    assert args.logging_nan_inf_filter is False
    assert args.dataloader_pin_memory == (device == "cuda")
    non_blocking = args.accelerator_config.non_blocking if hasattr(args.accelerator_config, "non_blocking") \
        else args.accelerator_config["non_blocking"]
    assert non_blocking == (device == "cuda")


def test_tf32_is_set_so_that_torch_still_answers_what_it_is():
    """The job turns TF32 on through torch's per-backend flags: inductor's GEMM autotuning then reads the precision
    back, which torch refuses after transformers' way (TrainingArguments(tf32=True): torch.backends.fp32_precision)."""
    from transformers.utils.import_utils import enable_tf32

    from job.trainer import use_tf32

    saved = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
             torch.backends.cudnn.fp32_precision)
    try:
        use_tf32(True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.allow_tf32
        use_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
        getattr(enable_tf32, "__wrapped__", enable_tf32)(True)   # (it is cached: once a process otherwise)
        with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
            torch.get_float32_matmul_precision()
    finally:
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision, \
            torch.backends.cudnn.fp32_precision = saved
        torch.get_float32_matmul_precision()   # answers again, for the tests after this one
