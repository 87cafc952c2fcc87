"""The speed levers change how a batch is laid out and computed, never what is learned from it: a padding-free
batch trains exactly like the padded one, no sequence sees or predicts another, and each lever is chosen from
the device unless the user sets it. (Their speed is measured on a GPU by bench/speed.py, docs/PERFORMANCE.md.)"""
import math
from types import SimpleNamespace

import pytest
import torch

from job.config import from_env
from job.speed.attention import data_collator
from job.speed.plan import SpeedPlan, plan

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


def test_a_padding_free_forward_waits_for_nothing_and_a_padded_batch_keeps_its_mask(tiny_model, monkeypatch):
    # transformers searches a maskless batch for packed sequences and reads the answer on the host: on a GPU a wait
    # at every forward's start for all queued work (the step before's optimizer too). A flattened batch has its
    # boundaries already, so the search must not run; a padded batch through the same attention keeps its mask.
    from transformers import masking_utils

    from job.model import add_lora, load_base_model, load_tokenizer

    searches = []
    search = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda *a, **k: searches.append(1) or search(*a, **k))
    config = from_env({"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false", "PADDING_FREE": "true"})
    speed = plan(config, "cpu")
    speed = SpeedPlan(**{**speed.__dict__, "padding_free": True})     # the GPU's choice, on the CPU
    tokenizer = load_tokenizer(config)
    model = add_lora(config, load_base_model(config, tokenizer, "cpu", speed), tokenizer).eval()
    assert model.config._attn_implementation == "sdpa_padding_free"
    feats = sequences(7, 4)
    with torch.no_grad():
        flat = model(**{k: v for k, v in data_collator(speed, tokenizer)(feats).items() if k != "labels"}).logits
        assert searches == []
        # The same two sequences padded on the left, with their mask: each one's logits as in the flat batch.
        ids = torch.tensor([feats[0]["input_ids"], [0] * 3 + feats[1]["input_ids"]])
        mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
        padded = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(padded[0], flat[0, :7], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[1, 3:], flat[0, 7:], rtol=1e-4, atol=1e-5)


def test_no_sequence_attends_across_or_predicts_into_its_neighbour(tiny_model):
    from job.model import load_tokenizer
    from job.speed.attention import padding_free_attention

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


@pytest.mark.parametrize("gib, expected", [(40, False), (48, True), (80, True), (141, True)])
def test_compiled_layers_keep_their_dequantized_weights_where_the_gpu_has_the_memory(monkeypatch, gib, expected):
    # The 7B's decoder weights in bf16 are 12.06 GiB (the H100 bench's peak grew by 12.05); with the defaults'
    # ~25 GiB for weights and activations, 37 GiB must fit within the same 80% the checkpointing choice leaves.
    import job.speed.plan

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=gib * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(job.speed.plan, "triton_available", lambda: True)
    kept = job.speed.plan.kept_weight_bytes(LLAMA_7B)
    assert kept == 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) * 2
    assert abs(kept / 2**30 / (24.25 - 12.20) - 1) < 0.01   # the bench's peaks with and without (batch 4, H100)
    # preflight's memory row counts them where the plan keeps them
    with_kept, without = (job.speed.plan.peak_memory(from_env({}), LLAMA_7B, 4, False, True, kept_weights=k)
                          for k in (True, False))
    assert with_kept.pop("kept weights") == kept and with_kept == without
    compiled = plan(from_env({}), "cuda", LLAMA_7B, steps=238)
    assert compiled.torch_compile and not compiled.gradient_checkpointing
    assert compiled.keep_weights is expected, compiled.reasons
    assert f"4-bit weights {'kept' if expected else 'not kept'}" in " ".join(compiled.reasons)
    assert compiled.describe()["keep_weights"] is expected   # in the speed event
    # Only compiled layers that are not recomputed keep them: not eager ones, not recomputed ones, not on a CPU.
    assert not plan(from_env({}), "cuda", LLAMA_7B, steps=10).keep_weights
    assert not plan(from_env({"GRADIENT_CHECKPOINTING": "true"}), "cuda", LLAMA_7B, steps=238).keep_weights
    assert not plan(from_env({"TORCH_COMPILE": "true"}), "cpu", LLAMA_7B, steps=238).keep_weights
    # The estimate is for the longest micro-batch the data allows: batch 24 of MAX_SEQ_LENGTH 1024 does not keep them
    # even on the largest GPU (the bench keeps them at batch 24 on an H100 by its kept-weights patch: 60.2 GiB).
    assert not plan(from_env({"PER_DEVICE_TRAIN_BATCH_SIZE": "24", "GRADIENT_CHECKPOINTING": "false"}), "cuda",
                    LLAMA_7B, steps=238).keep_weights


@pytest.mark.parametrize("gib, steps, expected", [(32, 238, False), (40, 238, True), (48, 238, False),
                                                  (48, 10, True), (80, 238, True)])
def test_a_paged_optimizers_states_stay_in_gpu_memory_where_the_gpu_holds_the_training(monkeypatch, gib, steps,
                                                                                       expected):
    # The whole estimated peak (preflight's memory row: weights, LoRA with Adam's moments, activations, kept
    # weights, overhead) within the checkpointing choice's 80%: 26.4 GiB compiled without kept weights (40 GiB),
    # 38.5 GiB with them (48 GiB keeps them, so its states stay paged; 80 GiB does not need to), 30.4 GiB eager.
    import job.speed.plan

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=gib * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(job.speed.plan, "triton_available", lambda: True)
    chosen = plan(from_env({}), "cuda", LLAMA_7B, steps=steps)
    assert not chosen.gradient_checkpointing
    peak = sum(job.speed.plan.peak_memory(from_env({}), LLAMA_7B, 4, False, True,
                                          kept_weights=chosen.keep_weights).values())
    assert (peak <= 0.8 * gib * 2**30) is expected
    assert chosen.optimizer_states_on_gpu is expected, chosen.reasons
    assert f"paged_adamw_32bit states {'in GPU memory' if expected else 'paged'}" in " ".join(chosen.reasons)
    assert chosen.describe()["optimizer_states_on_gpu"] is expected   # in the speed event
    # Only a paged optimizer's, only unrecomputed, only on a GPU.
    assert not plan(from_env({"OPTIM": "adamw_torch"}), "cuda", LLAMA_7B, steps=steps).optimizer_states_on_gpu
    assert not plan(from_env({"GRADIENT_CHECKPOINTING": "true"}), "cuda", LLAMA_7B, steps=steps
                    ).optimizer_states_on_gpu
    assert not plan(from_env({}), "cpu", LLAMA_7B, steps=steps).optimizer_states_on_gpu


def test_the_plans_optimizer_states_on_gpu_unpage_the_trainers_optimizer_before_its_first_step(tmp_path):
    # On a CPU bitsandbytes never pages (its states are plain tensors either way), so this holds the wiring: the
    # Trainer's paged optimizer made to keep its states unpaged where the plan says so, and left paged elsewhere.
    import bitsandbytes as bnb
    import datasets

    from job.speed.kernels import states_on_gpu
    from job.trainer import PersonaTrainer

    model = torch.nn.Linear(8, 8)
    args = transformers_args(tmp_path)
    for flag in (True, False):
        trainer = PersonaTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([{"x": 1}]),
                                 optimizer_states_on_gpu=flag)
        optimizer = trainer.create_optimizer()
        assert isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit)   # transformers' paged_adamw_32bit
        assert optimizer.is_paged is not flag
    # Not once it has states (they would be of both kinds), and not other optimizers.
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    stepped = bnb.optim.PagedAdamW32bit(params)
    params[0].grad = torch.ones(4, 4)
    stepped.step()
    assert not states_on_gpu(stepped) and stepped.is_paged
    assert not states_on_gpu(torch.optim.AdamW(params))


def test_the_trainer_clips_the_trainable_gradients_as_the_trainer_clipped_all_of_them(tmp_path):
    # The same norm and the same clipped gradients as torch's clip over every parameter (the frozen ones have none),
    # from a list made once: later steps no longer walk the model's parameters.
    import datasets

    from job.trainer import PersonaTrainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[1].requires_grad_(False)
    params = list(model.parameters())
    args = transformers_args(tmp_path)
    args.max_grad_norm = 0.3
    trainer = PersonaTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([{"x": 1}]))
    for step in range(2):
        for p in params:
            p.grad = None
        model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).square().sum().backward()
        with_grads = [p for p in params if p.grad is not None]
        reference = [torch.nn.Parameter(torch.zeros_like(p)) for p in with_grads]
        for r, p in zip(reference, with_grads):
            r.grad = p.grad.clone()
        want = torch.nn.utils.clip_grad_norm_(reference, 0.3)
        got = trainer._clip_grad_norm(model)
        assert torch.equal(got, want) and got > 0.3   # it clipped
        assert len(with_grads) == 4 and all(torch.equal(p.grad, r.grad) for p, r in zip(with_grads, reference))
        model.parameters = None   # not walked again: the second step would fail on it
    assert trainer._trainable == with_grads


def transformers_args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), optim="paged_adamw_32bit", use_cpu=True, report_to=[],
                             save_strategy="no")


def test_the_lora_matrices_are_made_on_the_bases_device_not_moved_there(tiny_model, monkeypatch):
    # peft makes them on the default device and then moves them to the base layer's; add_lora makes the base's device
    # the default while peft makes them (on a GPU: no host tensors to zero, initialize and copy). Whatever default
    # the caller had: here "meta", which peft would have made them on.
    import peft

    from job.model import add_lora, load_base_model, load_tokenizer

    class Made(Exception):
        pass

    seen = []

    def recording(model, config, *args, **kwargs):
        seen.append(torch.get_default_device())
        raise Made()

    monkeypatch.setattr(peft, "get_peft_model", recording)
    config = from_env({"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false"})
    tokenizer = load_tokenizer(config)
    base = load_base_model(config, tokenizer, "cpu", plan(config, "cpu"))
    with torch.device("meta"), pytest.raises(Made):
        add_lora(config, base, tokenizer)
    assert seen == [base.get_input_embeddings().weight.device] == [torch.device("cpu")]


def test_checkpoint_files_finished_in_the_background_reach_the_uploader_complete_and_in_order(tmp_path):
    import time

    from job.speed.snapshot import CheckpointWriter

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


def test_checkpoint_scratch_files_are_not_fsynced_but_their_store_copies_are(tmp_path, monkeypatch):
    """The writer's files are scratch: the store's copy is the durable one, made from them and checked against the
    hash taken as they were written. So fsync happens once per file, in the store, not twice."""
    import os

    from job.speed.snapshot import CheckpointWriter
    from job.trainer import _torch_save
    from job.store.local import LocalStore
    from job.store.run_store import RunStore

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    folder = tmp_path / "work" / "checkpoint-5"
    folder.mkdir(parents=True)
    writer = CheckpointWriter()
    writer.write({"w": torch.ones(4)}, folder / "optimizer.pt", _torch_save)
    (folder / "trainer_state.json").write_text("{}")   # a file the Trainer writes itself
    written = writer.seal(folder)
    writer.close()
    assert set(written) == {"optimizer.pt", "trainer_state.json"}
    assert not [p for p in synced if "/work/" in p], synced

    RunStore(LocalStore(tmp_path / "store"), "run").commit_checkpoint(5, folder, "fp", written=written)
    stored = [p for p in synced if "/store/" in p]
    assert any("optimizer.pt" in p for p in stored) and any("trainer_state.json" in p for p in stored)
    # a scratch file changed after it was written is still refused
    (folder / "optimizer.pt").write_bytes(b"changed")
    from job.store.run_store import CorruptCheckpoint
    with pytest.raises(CorruptCheckpoint):
        RunStore(LocalStore(tmp_path / "store"), "run").commit_checkpoint(6, folder, "fp", written=written)


def test_torch_compile_is_chosen_by_the_runs_length_on_a_modern_gpu(monkeypatch):
    import job.speed.plan

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(job.speed.plan, "triton_available", lambda: True)
    monkeypatch.setattr(job.speed.plan, "liger_available", lambda: True)
    repays = math.ceil(job.speed.plan.COMPILE_SECONDS / job.speed.plan.COMPILE_SAVING_PER_STEP)

    long = plan(from_env({}), "cuda", LLAMA_7B, steps=repays)
    assert long.torch_compile and not long.liger_kernel, long.reasons   # inductor fuses what Liger would
    assert not long.gradient_checkpointing and f">= {repays}" in " ".join(long.reasons)
    short = plan(from_env({}), "cuda", LLAMA_7B, steps=repays - 1)
    assert not short.torch_compile and short.liger_kernel
    assert f"{repays - 1} steps to run" in " ".join(short.reasons)
    assert plan(from_env({}), "cuda", LLAMA_7B, steps=238).torch_compile   # the seed's run: 950 rows, 4 a step
    assert not plan(from_env({}), "cuda", LLAMA_7B).torch_compile   # length unknown (preflight's estimate)
    assert not plan(from_env({}), "cuda", LLAMA_7B, steps=10**6, world_size=2).torch_compile   # not measured
    # The user's word wins, both ways.
    assert plan(from_env({"TORCH_COMPILE": "true"}), "cuda", LLAMA_7B, steps=10).torch_compile
    assert not plan(from_env({"TORCH_COMPILE": "false"}), "cuda", LLAMA_7B, steps=10**6).torch_compile
    # Liger asked for: auto does not compile (dynamo cannot trace Liger's kernels), and Liger runs.
    liger = plan(from_env({"USE_LIGER_KERNEL": "true"}), "cuda", LLAMA_7B, steps=10**6)
    assert not liger.torch_compile and liger.liger_kernel and "USE_LIGER_KERNEL=true" in " ".join(liger.reasons)
    # Where the memory rule recomputes whole layers (a 16 GB GPU), auto compiles them too for a long enough run,
    # and a short run keeps the eager path with Liger's kernels.
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=16 * 2**30))
    small = plan(from_env({}), "cuda", LLAMA_7B, steps=10**6)
    assert small.gradient_checkpointing and small.recompute == "layers" and small.torch_compile
    assert not small.liger_kernel
    short = plan(from_env({}), "cuda", LLAMA_7B, steps=10)
    assert short.gradient_checkpointing and not short.torch_compile and short.liger_kernel
    for setting in ("true", "offload"):
        asked = plan(from_env({"TORCH_COMPILE": "true", "GRADIENT_CHECKPOINTING": setting}), "cuda", LLAMA_7B,
                     steps=10)
        assert asked.gradient_checkpointing and asked.torch_compile
    # Selective recomputation's checkpoint sits inside the compiled layer, where inductor failed on a GPU: not
    # compiled, and the speed event says so.
    for env in ({"GRADIENT_CHECKPOINTING": "selective"},
                {"GRADIENT_CHECKPOINTING": "selective", "TORCH_COMPILE": "true"}):
        asked = plan(from_env(env), "cuda", LLAMA_7B, steps=10**6)
        assert asked.recompute == "selective" and not asked.torch_compile and asked.liger_kernel
        said = " ".join(asked.reasons)
        assert "torch.compile off" in said and "selective recomputation checkpoints inside" in said
        assert ("(TORCH_COMPILE=true set aside)" in said) == ("TORCH_COMPILE" in env)
    # Not before Ampere, and never on a CPU.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    assert not plan(from_env({}), "cuda", LLAMA_7B, steps=10**6).torch_compile
    assert not plan(from_env({}), "cpu", LLAMA_7B, steps=10**6).torch_compile


@pytest.mark.parametrize("env, rows, world, expected", [
    ({}, 900, 1, 225),                                              # 900 rows, 4 a step, one epoch
    ({"NUM_TRAIN_EPOCHS": "2"}, 901, 1, 452),                       # a last short batch counts
    ({"GRADIENT_ACCUMULATION_STEPS": "3"}, 900, 1, 75),
    ({"GRADIENT_ACCUMULATION_STEPS": "4"}, 900, 1, 57),             # 225 micro-batches: 56 steps + a short one
    ({}, 900, 2, 225),                                              # batch 4 split 2 + 2 over two GPUs
    ({"SCALE_BATCH_WITH_GPUS": "true"}, 900, 2, 113),               # 4 per GPU: 8 a step
    ({"MAX_STEPS": "40"}, 900, 2, 40),
])
def test_the_planned_steps_are_the_trainers(env, rows, world, expected):
    from job.trainer import planned_steps

    assert planned_steps(from_env(env), rows, world) == expected


def test_the_optimizer_step_without_syncs_updates_exactly_as_bitsandbytes_does(monkeypatch):
    import bitsandbytes as bnb
    import bitsandbytes.optim.optimizer as bnb_optimizer

    from job.speed.kernels import without_per_parameter_syncs

    syncs = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: syncs.append(1))
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 4096), (4096, 64), (300,), (8, 8)]   # the LoRA shapes bitsandbytes pages, and small ones
    start = [torch.randn(s, generator=gen) for s in shapes]
    theirs, ours = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    opt_theirs = bnb.optim.PagedAdamW32bit(theirs, lr=1e-2, weight_decay=0.01)
    opt_ours = bnb.optim.PagedAdamW32bit(ours, lr=1e-2, weight_decay=0.01)
    without_per_parameter_syncs(opt_ours)
    for step in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for params in (theirs, ours):
            for p, g in zip(params, grads):
                p.grad = None if (step == 1 and p.shape == (8, 8)) else g.clone()   # a parameter without grad
        before = len(syncs)
        opt_theirs.step()
        assert len(syncs) > before
        before = len(syncs)
        opt_ours.step()
        assert len(syncs) == before          # no waits
    for a, b in zip(theirs, ours):
        assert torch.equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(opt_theirs.state[a].values(), opt_ours.state[b].values())
                   if isinstance(x, torch.Tensor))
    assert opt_theirs.state_dict()["state"].keys() == opt_ours.state_dict()["state"].keys()


def test_the_adam_kernel_called_directly_gets_the_arguments_update_step_gives_it(monkeypatch):
    # The job's step calls bitsandbytes' CUDA kernel for a 32-bit AdamW update itself (kernels._adam_32bit). With no
    # CUDA here, a stand-in kernel records what it was called with, and bitsandbytes' own path (update_step, down
    # to F.optimizer_update_32bit, whose operator passes the same values on to the kernel) is recorded beside it:
    # every argument must be the one update_step gives, over steps with another learning rate and a parameter
    # without a gradient. (On the GPU bench/optim_check.py holds the parameters bitwise equal.)
    import ctypes
    import sys
    import types

    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    import job.speed.kernels as kernels

    direct, reference = [], []
    fake = types.ModuleType("bitsandbytes.backends.cuda.ops")
    fake.str2optimizer32bit = {"adam": (lambda *args: direct.append(args), None, None)}
    monkeypatch.setitem(sys.modules, "bitsandbytes.backends.cuda.ops", fake)
    monkeypatch.setattr(kernels, "_direct", lambda p: True)
    monkeypatch.setattr(F, "optimizer_update_32bit", lambda *args, **kwargs: reference.append((args, kwargs)))
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 4096), (4096, 64), (300,)]
    ours, theirs = ([torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes] for _ in range(2))
    opt_ours = bnb.optim.PagedAdamW32bit(ours, lr=2e-4, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.001)
    opt_theirs = bnb.optim.PagedAdamW32bit(theirs, lr=2e-4, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.001)
    kernels.without_per_parameter_syncs(opt_ours)
    kernels.without_per_parameter_syncs(opt_theirs)
    opt_theirs._job_adam_32bit = None   # _adam_32bit's cache: bitsandbytes' update_step
    grads = {id(p): torch.ones_like(p) for p in ours + theirs}   # the same tensors every step: their addresses
    for step, lr in enumerate((2e-4, 1.5e-4)):
        for params in (ours, theirs):
            for p in params:
                p.grad = None if (step == 1 and p.shape == (300,)) else grads[id(p)]
            params[0].grad.mul_(2)
        for opt in (opt_ours, opt_theirs):
            opt.param_groups[0]["lr"] = lr
            opt.step()
    assert opt_ours._job_adam_32bit is not None and len(direct) == len(reference) == 5
    f32 = lambda x: ctypes.c_float(x).value   # noqa: E731 - the kernel's float arguments
    updated = [ours[0], ours[1], ours[2], ours[0], ours[1]]
    for args, (p, (ref, ref_kw)) in zip(direct, zip(updated, reference)):
        name, _g, _p, _s1, beta1, eps, step, lr, _s2, beta2, beta3, alpha, weight_decay, gnorm_scale, unorm = ref
        state = opt_ours.state[p]
        values = [a.value if isinstance(a, (ctypes.c_void_p, ctypes.c_float, ctypes.c_int32, ctypes.c_bool))
                  else a for a in args]
        assert name == "adam" and unorm is None and ref_kw["max_unorm"] == 0.0
        assert values == [grads[id(p)].data_ptr(), p.data_ptr(), state["state1"].data_ptr(), state["state2"].data_ptr(),
                          None, 0.0, 0.0, f32(beta1), f32(beta2), f32(beta3), f32(alpha), f32(eps),
                          f32(weight_decay), step, f32(lr), f32(gnorm_scale), ref_kw["skip_zeros"], p.numel()]
    assert [opt_ours.state[p]["step"] for p in ours] == [opt_theirs.state[p]["step"] for p in theirs] == [2, 2, 1]


def test_a_compiled_run_trains_like_the_eager_one(cpu_job, tmp_path):
    """TORCH_COMPILE=true on the CPU: the decoder layers' forward and backward captured by torch.compile
    (aot_eager there: the same graphs, eager kernels) train as the eager layers do, with the job's paged
    optimizer; evaluation (no grad) runs the eager code. Padded batches: the CPU's padding-free attention breaks
    the graph at every sequence, which makes the compile alone take 17 s more here (the GPU's padding-free compiled
    layers are checked by bench/gpu_e2e.py's numerics)."""
    import json

    from conftest import run_job

    runs = {}
    for compiled in ("false", "true"):
        env = cpu_job(TORCH_COMPILE=compiled, PADDING_FREE="false", OPTIM="paged_adamw_32bit", MAX_STEPS="6",
                      SAVE_STEPS="3", EVAL_STEPS="3", OUTPUT_DIR=str(tmp_path / f"out-{compiled}"),
                      CHECKPOINT_URI=str(tmp_path / f"store-{compiled}"))
        result = run_job("train", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[compiled] = result, json.loads((tmp_path / f"out-{compiled}" / "training_summary.json").read_text())
    eager, compiled = runs["false"][1], runs["true"][1]
    assert [e["event"] for e in runs["true"][0].events("speed")] and any(
        "torch.compile: 2 decoder layers" in e.get("message", "") for e in runs["true"][0].events("speed"))
    assert not any("torch.compile:" in e.get("message", "") for e in runs["false"][0].events("speed"))
    losses = lambda s: [x["loss"] for x in s["train_loss"]]   # noqa: E731
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert compiled["final_eval_loss"] == pytest.approx(eager["final_eval_loss"], rel=1e-4)
    assert compiled["evaluation"]["tuned"]["loss"] == pytest.approx(eager["evaluation"]["tuned"]["loss"], rel=1e-4)

    from safetensors.torch import load_file
    a = load_file(tmp_path / "out-false" / "adapter_model.safetensors")
    b = load_file(tmp_path / "out-true" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)


def test_compiled_layers_take_the_layers_floats_as_constants_not_cpu_tensors(tiny_model, monkeypatch):
    """Dynamo's default turns each Python float of a layer (RMSNorm's epsilon, LoRA's dropout and scaling,
    attention's scale) into a float64 CPU tensor input read back with `.item()`: CPU operations in a GPU graph,
    which made inductor compile C++. compile_layers compiles them in as constants; the compiled layers still
    compute the eager loss and gradients."""
    import torch._dynamo

    from job.speed.kernels import compile_layers

    monkeypatch.setattr(torch._dynamo.config, "specialize_float", False)   # the default, whatever ran before
    torch._dynamo.reset()
    feats = sequences(5, 9, 4)
    eager_loss, eager_grads, _ = loss_and_grads(tiny_model, "false", feats, LORA_DROPOUT="0")
    graphs = []

    def recording(gm, inputs):
        graphs.append([type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dim(), x.dtype)
                       for x in inputs])
        return gm.forward    # the captured graph run as it is: its inputs are what this test is about

    from job import model as job_model
    add_lora = job_model.add_lora
    monkeypatch.setattr(job_model, "add_lora", lambda *a: (m := add_lora(*a), compile_layers(m, recording))[0])
    loss, grads, _ = loss_and_grads(tiny_model, "false", feats, LORA_DROPOUT="0")
    torch._dynamo.reset()
    assert graphs, "nothing was compiled"
    floats = [x for g in graphs for x in g if isinstance(x, tuple) and x[0] == 0 and x[1].is_floating_point]
    assert not floats, f"float scalars passed as tensors: {floats}"
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_persona_tokens_rows_train_as_peft_trains_them_without_copying_the_embedding_or_output_matrix(
        tiny_model):
    """peft's trainable tokens merge the two trainable rows into a copy of the whole embedding and lm_head matrix on
    every forward, and lm_head's copy is kept for the backward pass; the job's lean forward (speed/tokens.py) gives
    the same loss and gradients and keeps no matrix-sized tensor for the backward pass but the frozen weights."""
    from peft import LoraConfig, get_peft_model

    from job.model import add_lora, load_base_model, load_tokenizer, persona_token_ids

    config = from_env({"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false", "LORA_DROPOUT": "0"})
    speed = plan(config, "cpu")
    tokenizer = load_tokenizer(config)
    persona = persona_token_ids(tokenizer)
    feats = sequences(12, 9)
    for f in feats:   # the persona tokens in the input and as labels
        f["input_ids"][2], f["input_ids"][-3] = persona[0], persona[-1]
        f["labels"][-4], f["labels"][-3] = persona[-1], persona[0]

    def run(lean):
        torch.manual_seed(0)
        base = load_base_model(config, tokenizer, "cpu", speed)
        if lean:
            model = add_lora(config, base, tokenizer)
        else:
            model = get_peft_model(base, LoraConfig(
                r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=config.target_modules,
                bias="none", task_type="CAUSAL_LM",
                trainable_token_indices={"embed_tokens": persona, "lm_head": persona}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "trainable_tokens_delta" in name or "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append((t.numel(), t.untyped_storage().data_ptr())) or t, lambda t: t):
            loss = model(**data_collator(speed, tokenizer)(feats)).loss
        loss.backward()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = [n for n, storage in saved if storage not in weights]   # views of the weights cost nothing
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, saved, model

    peft_loss, peft_grads, peft_saved, _ = run(lean=False)
    loss, grads, saved, model = run(lean=True)
    matrix = model.get_input_embeddings().weight.numel()
    big = lambda sizes: [n for n in sizes if n >= matrix]   # noqa: E731
    assert big(peft_saved)                         # peft's copy of lm_head, kept for the backward pass
    assert not big(saved), big(saved)
    assert loss == pytest.approx(peft_loss, rel=1e-6)
    assert grads.keys() == peft_grads.keys() and any("trainable_tokens_delta" in n for n in grads)
    for name in grads:
        assert grads[name] is not None and peft_grads[name] is not None, name
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for name, g in grads.items():   # the persona rows learn from both the input and the labels
        if "trainable_tokens_delta" in name:
            assert g.abs().sum(-1).gt(0).all(), name


@pytest.mark.parametrize("padding_free", ["true", "false"])
def test_the_training_loss_in_chunks_is_transformers_loss_without_the_batchs_logits(tiny_model, monkeypatch,
                                                                                   padding_free):
    """speed/loss.py: the loss and every gradient as transformers computes them from the full logits, a few tokens
    at a time (5 here, so a batch takes several chunks), with the persona tokens among inputs and labels; nothing of
    the logits' size is kept for the backward pass; evaluation (no gradients) still gets the logits."""
    from job.model import load_tokenizer, persona_token_ids
    from job.speed import loss as chunked

    tokenizer = load_tokenizer(from_env({"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false"}))
    persona, vocab = persona_token_ids(tokenizer), len(tokenizer)
    feats = sequences(12, 9, 7)
    for f in feats:
        f["input_ids"][1], f["labels"][-2], f["labels"][-1] = persona[0], persona[-1], persona[0]
    installed = chunked.chunked_loss

    def run(on):
        monkeypatch.setattr(chunked, "chunked_loss", installed if on else lambda model: False)
        sizes = []
        weight = lambda t: isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(0 if weight(t) else t.numel()) or t,
                                                      lambda t: t):   # a weight or a view of one costs nothing
            out = loss_and_grads(tiny_model, padding_free, feats, LORA_DROPOUT="0")
        return out, sizes

    monkeypatch.setattr(chunked, "CHUNK_BYTES", 5 * 4 * vocab)    # 5 tokens a chunk
    (loss, grads, batch), sizes = run(True)
    (whole, whole_grads, _), whole_sizes = run(False)
    logits = batch["input_ids"].numel() * vocab
    assert max(whole_sizes) >= logits > max(sizes)
    assert loss == pytest.approx(whole, rel=1e-5)
    assert len(grads) == len(whole_grads) > 0
    for a, b in zip(grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


_ISA_PROBES = """
import subprocess, sys, torch
from job.speed import kernels
kernels.without_cpu_isa_probes()
started = []
popen = subprocess.Popen.__init__
subprocess.Popen.__init__ = lambda self, args, *a, **k: started.append(args) or popen(self, args, *a, **k)
from torch._inductor.cpu_vec_isa import pick_vec_isa
isa = pick_vec_isa()
compiled = torch.compile(lambda x: (x * 2 + 1).sin().sum(), backend="inductor")   # scalar C++, still right
x = torch.randn(257)
assert torch.allclose(compiled(x), (x * 2 + 1).sin().sum(), atol=1e-4)
print(bool(isa), sum(1 for a in started if "python" in str(a[0] if isinstance(a, list) else a).split()[0]))
"""


def test_compiled_layers_generate_cpu_code_without_probing_the_cpus_vector_isas(tmp_path):
    """Before its first C++ kernel, inductor probes each vector ISA of the CPU by building a test library and
    loading it in a new Python process: 37.5 s of the compiled first step on an H200 machine. compile_layers turns
    the probe off (scalar C++ for the graph's few CPU operations); inductor's C++ kernels still compute right."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    env.pop("TORCHINDUCTOR_VEC_ISA_OK", None)
    result = subprocess.run([sys.executable, "-c", _ISA_PROBES], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # No ISA picked, no Python process started (inductor's default on this CPU: avx2, after such processes).
    assert result.stdout.split() == ["False", "0"]


def test_a_checkpoints_snapshots_are_all_taken_before_its_files_are_written_and_alternate_buffers():
    """HostSnapshot: nothing is written until submit() (a write beside a snapshot slowed it); a checkpoint's
    snapshot does not wait for the previous checkpoint's file, only for the one before it (same buffers); what is
    written is the state at the snapshot, not after later steps."""
    import threading
    import time

    from job.speed.snapshot import CheckpointWriter, HostSnapshot

    writer, written, held = CheckpointWriter(), [], threading.Event()
    snapshot = HostSnapshot(writer)

    def write(tree, tag):
        if tag == "optimizer 1":
            held.wait(10)            # the first checkpoint's optimizer file takes long to write
        written.append((tag, tree["w"].tolist()))

    state = torch.zeros(3)
    snapshot.write("adapter", {"w": state}, write, "adapter 1")
    snapshot.write("optimizer", {"w": state}, write, "optimizer 1")
    time.sleep(0.2)
    assert written == [], "nothing is written before the checkpoint's snapshots are all taken"
    snapshot.submit()
    state += 1                                   # the next steps change the state
    started = time.monotonic()
    snapshot.write("optimizer", {"w": state}, write, "optimizer 2")
    assert time.monotonic() - started < 0.5, "the second snapshot waited for the first checkpoint's write"
    snapshot.submit()
    state += 1
    third = threading.Thread(target=snapshot.write, args=("optimizer", {"w": state}, write, "optimizer 3"))
    third.start()
    third.join(0.5)
    assert third.is_alive(), "the third snapshot reuses the first one's buffers: it waits for that write"
    held.set()
    third.join(10)
    snapshot.submit()
    assert writer.wait(10)
    assert written == [("adapter 1", [0.0] * 3), ("optimizer 1", [0.0] * 3), ("optimizer 2", [1.0] * 3),
                       ("optimizer 3", [2.0] * 3)]


def test_double_quant_quantizes_the_nf4_scales_and_the_memory_model_counts_it(tiny_model):
    # DOUBLE_QUANT=true: every 4-bit layer's scales are themselves quantized (bitsandbytes' nested quant state), the
    # model still trains (a finite loss and LoRA gradients), and the preflight's estimate shrinks by the scales'
    # bytes; false (the default, the seed's NF4) keeps float32 scales.
    import bitsandbytes as bnb

    from job.model import add_lora, load_base_model, load_tokenizer
    from job.speed.plan import peak_memory

    nested = {}
    for setting in ("false", "true"):
        config = from_env({"BASE_MODEL": str(tiny_model), "REQUIRE_GPU": "false", "DOUBLE_QUANT": setting})
        tokenizer = load_tokenizer(config)
        model = add_lora(config, load_base_model(config, tokenizer, "cpu"), tokenizer)
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        nested[setting] = {bool(m.weight.quant_state.nested) for m in layers}
        ids = torch.randint(3, 100, (1, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert nested == {"false": {False}, "true": {True}}
    shape = SimpleNamespace(**vars(LLAMA_7B), num_attention_heads=32)
    saved = [peak_memory(from_env({"DOUBLE_QUANT": s}), shape, 4, True, True)["weights"] for s in ("false", "true")]
    per_weight = 4 / 64 - 1 / 64 - 4 / 16384      # a float32 scale per 64 -> a byte per 64 and a float32 per 16,384
    assert saved[0] - saved[1] == pytest.approx(32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) * per_weight, rel=1e-6)
