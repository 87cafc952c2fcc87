"""The speed levers change how a batch is laid out and computed, never what is learned from it: a padding-free
batch trains exactly like the padded one, no sequence sees or predicts another, and each lever is chosen from
the device unless the user sets it. (Their speed is measured on a GPU by bench/speed.py, docs/PERFORMANCE.md.)"""
from types import SimpleNamespace

import pytest
import torch

from job.config import from_env
from job.speed import SpeedPlan, data_collator, plan

LLAMA_7B = SimpleNamespace(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, vocab_size=32000)


def sequences(*lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 1000, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return out


def loss_and_grads(tiny_model, padding_free, feats, **env):
    from job.model import add_lora, load_base_model, load_tokenizer

    config = from_env({"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false", "LORA_TARGET_MODULES": "all-linear",
                       "LORA_DROPOUT": "0", "PADDING_FREE": padding_free, **env})
    speed = plan(config, "cpu")
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    model = add_lora(config, load_base_model(config, tokenizer, "cpu", speed), tokenizer)
    with torch.no_grad():  # LoRA B starts at zero; give it values so A's gradients pass through attention
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    batch = data_collator(speed, tokenizer)(feats)
    items = torch.tensor(sum(sum(1 for x in f["labels"][1:] if x != -100) for f in feats))
    loss = model(**batch, num_items_in_batch=items).loss
    loss.backward()
    return loss.item(), [p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None], \
        batch


def test_a_padding_free_batch_trains_like_the_padded_one(tiny_model):
    feats = sequences(37, 50, 23, 41)
    padded_loss, padded_grads, padded = loss_and_grads(tiny_model, "false", feats)
    flat_loss, flat_grads, flat = loss_and_grads(tiny_model, "true", feats)
    assert tuple(padded["input_ids"].shape) == (4, 50) and tuple(flat["input_ids"].shape) == (1, 151)
    assert flat_loss == pytest.approx(padded_loss, rel=1e-6)
    assert len(flat_grads) == len(padded_grads)
    for a, b in zip(flat_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_sequence_attends_across_or_predicts_into_its_neighbour(tiny_model):
    from job.model import load_tokenizer
    from job.speed import padding_free_attention

    feats = sequences(5, 4, 6)
    config = from_env({"BASE_MODEL": str(tiny_model), "PADDING_FREE": "true"})
    batch = data_collator(plan(config, "cpu"), load_tokenizer(config))(feats)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 9, 15] and batch["max_length_q"] == 6
    # The first label of every sequence is masked: the last token of one never learns the next one's first.
    assert [batch["labels"][0, i].item() for i in (0, 5, 9)] == [-100, -100, -100]

    # Attention: a change in the first sequence leaves the others' outputs untouched.
    q, k, v = (torch.randn(1, 2, 15, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True)
    kwargs = {"cu_seq_lens_q": batch["cu_seq_lens_q"], "max_length_q": 6}
    before, _ = padding_free_attention(module, q, k, v, None, **kwargs)
    k2 = k.clone()
    k2[:, :, :5] += 1.0
    after, _ = padding_free_attention(module, q, k2, v, None, **kwargs)
    assert not torch.equal(before[:, :5], after[:, :5])
    assert torch.equal(before[:, 5:], after[:, 5:])


def test_on_a_cpu_every_lever_is_off_so_the_cpu_run_stays_bit_exact():
    speed = plan(from_env({}), "cpu", LLAMA_7B)
    assert speed == SpeedPlan(padding_free=False, liger_kernel=False, tf32=False, gradient_checkpointing=False,
                              reasons=speed.reasons)
    assert speed.attn_implementation == "sdpa"


@pytest.mark.parametrize("gib, expected", [(16, True), (24, True), (40, False), (80, False), (141, False)])
def test_gradient_checkpointing_is_chosen_from_the_gpus_memory(monkeypatch, gib, expected):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=gib * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    speed = plan(from_env({}), "cuda", LLAMA_7B)
    assert speed.gradient_checkpointing is expected, speed.reasons
    assert speed.padding_free and speed.tf32 and speed.attn_implementation == "sdpa_padding_free"
    # The user's word wins over the memory rule, both ways.
    assert plan(from_env({"GRADIENT_CHECKPOINTING": "true"}), "cuda", LLAMA_7B).gradient_checkpointing
    assert not plan(from_env({"GRADIENT_CHECKPOINTING": "false"}), "cuda", LLAMA_7B).gradient_checkpointing
    # Larger micro-batches need recomputation sooner.
    big = plan(from_env({"PER_DEVICE_TRAIN_BATCH_SIZE": "32"}), "cuda", LLAMA_7B)
    assert big.gradient_checkpointing or gib > 141


def test_checkpoint_files_finished_in_the_background_reach_the_uploader_complete_and_in_order(tmp_path):
    import time

    from job.trainer import CheckpointWriter

    writer, seen = CheckpointWriter(), []

    def slow_write(path):
        time.sleep(0.2)
        path.write_text("optimizer state")

    for step in (50, 100):
        path = tmp_path / f"optimizer-{step}.pt"
        writer.submit(slow_write, path)
        writer.submit(lambda s=step, p=path: seen.append((s, p.exists())))   # what the uploader is handed
    assert writer.wait(timeout=5) and seen == [(50, True), (100, True)]

    writer.submit(lambda: 1 / 0)
    assert not writer.wait(timeout=5) and isinstance(writer.errors()[0], ZeroDivisionError)
    writer.close()
