"""GRADIENT_CHECKPOINTING's modes recompute, they never change what is learned: through the job's Trainer on the
CPU, whole-layer, selective and offloaded recomputation train to the eager run's losses and adapter, bit for bit,
and each mode really runs as named: what it keeps for the backward pass, what it runs again, where its kept inputs
go. (Their speed and GPU memory are measured on a GPU: bench/speed.py job-gc*.)"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import OpCounter

import job.speed.recompute
from job.config import from_env
from job.speed.plan import decoder_weights, plan

ROOT = Path(__file__).resolve().parent.parent


def sequences(n: int, seed: int = 0, base: int = 40) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = base + 13 * (i % 5)
        ids = torch.randint(3, 1000, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


def allocated() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2): every tensor on the CPU, including what a
    checkpoint or a recompute policy keeps where autograd's saved-tensor hooks do not see it."""
    info = ctypes.CDLL(None).mallinfo2
    info.restype = type("MallInfo2", (ctypes.Structure,), {"_fields_": [
        (n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                       "uordblks", "fordblks", "keepcost")]})
    m = info()
    return m.uordblks + m.hblkhd


def train(model_dir, tmp_path, setting: str, targets: str = "all-linear", rows: list[dict] | None = None,
          steps: int = 3, watch=None, compiled: bool = False, padding_free: bool = True, on_model=None,
          keep_weights: bool = False):
    """Optimizer steps of the job's Trainer (LoRA dropout 0.1, as the seed) with GRADIENT_CHECKPOINTING: the logged
    losses, the adapter, the ops run, and the bytes each step's forward pass left allocated for its backward.
    `on_model` is called with the model before training."""
    import datasets

    from job.model import add_lora, load_base_model, load_tokenizer
    from job.speed.attention import data_collator
    from job.trainer import PersonaTrainer, training_arguments

    config = from_env({"BASE_MODEL": str(model_dir), "REQUIRE_GPU": "false", "LORA_TARGET_MODULES": targets,
                       "GRADIENT_CHECKPOINTING": setting, "MAX_STEPS": str(steps), "LOGGING_STEPS": "1",
                       "OPTIM": "adamw_torch", "LEARNING_RATE": "1e-2",
                       "PADDING_FREE": str(padding_free).lower()})
    speed = plan(config, "cpu")
    assert speed.gradient_checkpointing == (setting != "false")
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    model = add_lora(config, load_base_model(config, tokenizer, "cpu", speed), tokenizer)
    if compiled:   # TORCH_COMPILE=true's layers (aot_eager on the CPU)
        from job.speed.kernels import compile_layers
        torch._dynamo.reset()
        compile_layers(model, recomputed=speed.recompute in ("layers", "offload"),   # as job/run.py does
                       keep_weights=keep_weights)
    with torch.no_grad():  # LoRA B starts at zero; give it values so every gradient path carries something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    if on_model:
        on_model(model)
    args = training_arguments(config, tmp_path / setting, "cpu", False, speed)
    trainer = PersonaTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows or sequences(12)),
                             data_collator=data_collator(speed, tokenizer), processing_class=tokenizer,
                             callbacks=job.speed.recompute.callbacks(speed.recompute))
    kept = []
    compute_loss = trainer.compute_loss

    def measured(*args, **kwargs):
        before = allocated()
        loss = compute_loss(*args, **kwargs)
        kept.append(allocated() - before)
        if watch:
            watch(loss)
        return loss
    trainer.compute_loss = measured
    ops = OpCounter()
    # torch.compile runs nothing compiled under a dispatch mode: compiled runs count no ops.
    with ops if not compiled else contextlib.nullcontext():
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, adapter, ops.counts, kept


@pytest.fixture(scope="module")
def eager(tiny_model, tmp_path_factory):
    return train(tiny_model, tmp_path_factory.mktemp("eager"), "false")


@pytest.mark.parametrize("setting", ["true", "selective", "offload"])
def test_each_recompute_mode_trains_to_the_eager_runs_losses_and_adapter_exactly(tiny_model, tmp_path, eager,
                                                                                monkeypatch, setting):
    offloaded, packs, events = [], [], []   # events: each layer's MLP (with gradients or not), each copy back
    to_host, copy_back = job.speed.recompute.to_host, job.speed.recompute._copy_back

    def watched_offload(tensor):
        offloaded.append(tuple(tensor.shape))
        packs.append(to_host(tensor))
        events.append(f"out {len(packs) - 1}")
        return packs[-1]

    def watched_copy_back(packed):
        events.append(f"back {next(i for i, p in enumerate(packs) if p is packed)}")
        return copy_back(packed)
    monkeypatch.setattr(job.speed.recompute, "to_host", watched_offload)
    monkeypatch.setattr(job.speed.recompute, "_copy_back", watched_copy_back)
    grad_modes = []   # whether each layer's MLP ran with gradients, in order

    def watch_mlps(model):
        for i, layer in enumerate(model.get_base_model().model.layers):
            def watch(*_, i=i):
                grad_modes.append(torch.is_grad_enabled())
                events.append(f"mlp {i} {'backward' if torch.is_grad_enabled() else 'forward'}")
            layer.mlp.register_forward_hook(watch)

    losses, adapter, ops, _ = train(tiny_model, tmp_path, setting, on_model=watch_mlps)

    assert losses == eager[0]
    assert adapter.keys() == eager[1].keys()
    assert all(torch.equal(adapter[n], eager[1][n]) for n in adapter), \
        [n for n in adapter if not torch.equal(adapter[n], eager[1][n])]
    # The forward runs each layer's seven 4-bit matmuls once (the backward's products are other ops).
    matmul, eager_ops = "bitsandbytes.gemm_4bit.default", eager[2]
    if setting == "selective":
        # The attention block runs again (its q/k/v/o projections: 4 of the 7), the MLP does not (no SiLU again).
        assert ops[matmul] * 7 == eager_ops[matmul] * 11, (ops[matmul], eager_ops[matmul])
        assert ops["aten.silu.default"] == eager_ops["aten.silu.default"]
    else:   # whole layers: every op of the forward again, the MLP's included
        assert ops[matmul] == eager_ops[matmul] * 2, (ops[matmul], eager_ops[matmul])
        assert ops["aten.silu.default"] == eager_ops["aten.silu.default"] * 2
    # Whole layers run their forward without gradients (nothing saved) and again with them in the backward pass;
    # selective's MLP runs once, with gradients (it keeps its activations).
    shape = json.loads((tiny_model / "config.json").read_text())
    layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
    if setting == "selective":
        assert grad_modes == [True] * layers * 3
    else:
        assert grad_modes == ([False] * layers + [True] * layers) * 3, grad_modes
    # offload: each layer's input and nothing else (2 layers, 3 steps), packed to the host; in the backward pass the
    # first layer's input comes back (prefetched) before the second layer is recomputed, not after.
    assert len(offloaded) == (2 * 3 if setting == "offload" else 0)
    assert all(s[0] == 1 and s[-1] == hidden for s in offloaded), offloaded
    if setting == "offload":
        assert events == [e for step in range(3) for e in (
            "mlp 0 forward", f"out {2 * step}", "mlp 1 forward", f"out {2 * step + 1}",
            f"back {2 * step + 1}", f"back {2 * step}", "mlp 1 backward", "mlp 0 backward")], events
        # and nothing is left waiting for a backward pass once the steps are done
        assert not any(job.speed.recompute._ON_HOST.values()), job.speed.recompute._ON_HOST


@pytest.fixture(scope="module")
def eager_padded(tiny_model, tmp_path_factory):
    return train(tiny_model, tmp_path_factory.mktemp("eager-padded"), "false", padding_free=False)


@pytest.mark.parametrize("setting", ["true", "selective", "offload"])
def test_each_mode_in_compiled_layers_trains_to_the_eager_runs_losses_and_adapter_exactly(tiny_model, tmp_path,
                                                                                          eager_padded, monkeypatch,
                                                                                          setting):
    # Whole recomputed layers (true, offload) compile only their forward, and it runs twice a step: without
    # gradients in the forward pass, keeping nothing (its own graph, compiled once), and with them when the
    # backward pass recomputes it (one graph for every layer). Inductor failed on an H200 on the checkpoint traced
    # into a compiled layer as a higher-order op, which is how selective recomputation's attention block compiles
    # (the plan does not compile that on a GPU). aot_eager: AOTAutograd's forward and backward graphs, as inductor
    # gets them, run by eager kernels. (Padded batches: the CPU's padding-free attention breaks the graph at every
    # sequence.)
    import job.speed.kernels as kernels
    from torch._dynamo.backends.registry import lookup_backend

    graphs, calls = [], collections.Counter()

    def recording(gm, inputs):
        graphs.append((gm, torch.is_grad_enabled()))
        compiled = lookup_backend("aot_eager")(gm, inputs)
        index = len(graphs) - 1

        def run(*args):
            calls[index, torch.is_grad_enabled()] += 1
            return compiled(*args)
        return run
    compile_layers = kernels.compile_layers
    monkeypatch.setattr(kernels, "compile_layers",
                        lambda model, recomputed, keep_weights: compile_layers(model, recording, recomputed,
                                                                               keep_weights))
    monkeypatch.setattr(kernels, "_COMPILED_FORWARDS", {})
    losses, adapter, _, _ = train(tiny_model, tmp_path, setting, compiled=True, padding_free=False)
    torch._dynamo.reset()

    assert losses == eager_padded[0]
    assert all(torch.equal(adapter[n], eager_padded[1][n]) for n in adapter)
    layers, steps = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"], 3
    hops = [[n for n in gm.graph.nodes if "checkpoint" in str(n.target).lower()] for gm, _ in graphs]
    if setting == "selective":
        assert len(graphs) == 1, f"{len(graphs)} graphs: the layers recompiled or the graph broke"
        assert hops[0] and calls == {(0, True): layers * steps}
    else:
        assert [grad for _, grad in graphs] == [False, True], "one graph without gradients, one with"
        assert not any(hops), hops
        assert calls == {(0, False): layers * steps, (1, True): layers * steps}, \
            "each layer's compiled forward runs without gradients in the forward pass, with them in the backward"


def test_compiled_layers_keeping_their_dequantized_weights_train_to_the_eager_runs_losses_and_keep_those_weights(
        wider_model, tmp_path):
    """The speed plan's keep_weights (nf4.keep, where the GPU has the memory): the compiled layers' 4-bit weights
    dequantized once for the run, and every step's forward and backward passes multiplying by that copy. The same
    losses and adapter as eager, bit for bit; the copy is the layers' weights, dequantized, and a step keeps
    nothing more for its backward pass than without it (no new copy a step)."""
    rows = sequences(8, base=40)
    copies = []

    def resident(model):
        copies.append(sum(m.dequantized.numel() * m.dequantized.element_size()
                          for m in model.modules() if hasattr(m, "dequantized")))
    runs = {name: train(wider_model, tmp_path / name, "false", targets="q_proj,v_proj", rows=rows, steps=2,
                        compiled=compiled, padding_free=False, keep_weights=keep, on_model=resident)
            for name, compiled, keep in (("eager", False, False), ("compiled", True, False), ("kept", True, True))}
    torch._dynamo.reset()

    for name in ("compiled", "kept"):
        losses, adapter = runs[name][:2]
        assert losses == runs["eager"][0], name
        assert all(torch.equal(adapter[n], runs["eager"][1][n]) for n in adapter), name
    shape = SimpleNamespace(**json.loads((wider_model / "config.json").read_text()))
    weights = decoder_weights(shape) * 4   # float32 on the CPU
    assert copies == [0, 0, weights]
    extra = min(runs["kept"][3]) - min(runs["compiled"][3])
    assert abs(extra) < 0.1 * weights, (extra, weights)


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory):
    """Wide enough that the layers' activations, not the logits, are most of what a step keeps."""
    from job.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("wider-llama"), layers=4, hidden=256)


def test_selective_keeps_much_less_than_no_recomputation_and_more_than_whole_layers(wider_model, tmp_path):
    # What the H200 run of 2026-11-29 15:00 UTC found: selective recomputation that kept every matmul's output kept
    # as much as no recomputation (12.86 GiB, eager's peak): in a LoRA model over a frozen base those outputs are
    # most of what eager keeps anyway, and it also kept outputs eager never does (o_proj's, down_proj's). On the CPU
    # here it kept 89% of eager's bytes. The job's default adapter (q_proj,v_proj), sequences of ~300 tokens.
    rows = sequences(8, base=280)
    kept = {setting: min(train(wider_model, tmp_path / setting, setting, targets="q_proj,v_proj", rows=rows,
                               steps=2)[3])
            for setting in ("false", "selective", "true")}
    assert kept["true"] < kept["selective"] < 0.75 * kept["false"], kept


def test_offload_keeps_the_gradients_on_the_device(tiny_model, tmp_path):
    # The layer's input goes to the host as a saved tensor only; the gradient flowing back through the layers takes
    # no detour through a host copy (on a GPU each such copy back made the host wait for the GPU, twice a layer).
    def nodes(loss) -> collections.Counter:
        names, seen, todo = collections.Counter(), set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            names[node.name()] += 1
            todo.extend(next_ for next_, _ in node.next_functions)
        return names

    graphs = {}
    for setting in ("true", "offload"):
        graphs[setting] = []
        train(tiny_model, tmp_path / setting, setting, steps=1, watch=lambda loss: graphs[setting].append(nodes(loss)))
    assert graphs["offload"] == graphs["true"]


def test_the_benchs_job_path_puts_the_mode_on_the_layers(tiny_model, tmp_path, monkeypatch):
    # bench/speed.py builds the job's Trainer through Run.setup with callbacks of its own (BenchRun): the speed
    # plan's recomputation must still be what runs, as in `python -m job train`.
    sys.path.insert(0, str(ROOT / "bench"))
    import speed as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    settings = {"GRADIENT_CHECKPOINTING": "selective", "REQUIRE_GPU": "false", "OPTIM": "adamw_torch",
                "LORA_TARGET_MODULES": "all-linear"}
    trainer, info = bench.run_job(tiny_model, sequences(8), 4, 1, settings, tmp_path, bench.make_meter(False))
    assert info["plan"]["recompute"] == "selective"
    trainer.train()
    layers = trainer.model.get_base_model().model.layers
    assert all(layer._gradient_checkpointing_func is job.speed.recompute.layer_as_is for layer in layers)
    assert all(layer.self_attn.recomputed_in_backward for layer in layers)


def test_the_modes_resolve_from_the_setting():
    config = from_env({"GRADIENT_CHECKPOINTING": "selective"})
    assert plan(config, "cpu").recompute == "selective"
    assert plan(from_env({"GRADIENT_CHECKPOINTING": "true"}), "cpu").recompute == "layers"
    assert plan(from_env({"GRADIENT_CHECKPOINTING": "offload"}), "cpu").recompute == "offload"
    assert plan(from_env({}), "cpu").recompute == "" and not plan(from_env({}), "cpu").gradient_checkpointing
    for mode in ("layers", "selective", "offload"):   # JSON, as TrainingArguments is written out
        assert job.speed.recompute.checkpoint_kwargs(mode) == {"use_reentrant": False}
