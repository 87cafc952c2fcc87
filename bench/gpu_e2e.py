"""GPU end to end: the real job on a GPU, stopped by SIGTERM mid-run, restarted, finished and published.

    python bench/gpu_e2e.py --out DIR

1. Numerics on this GPU: the job's padding-free batch (flash-attention varlen) against the padded batch, and
   Liger's fused kernels against transformers' own, on the same small model: loss and LoRA gradients.
2. The run: `python -m job train` as a subprocess (the container's command), with the job's defaults on a small
   Llama built here (4 layers, hidden 256) and the shipped persona sample, checkpoints every 25 steps into moto's
   S3 server on loopback, and HUB_MODEL_ID pointing at the Hub test server (tests/fakes/hub.py) over HTTP.
   After the first committed checkpoint it gets SIGTERM and must exit 75; started again with the same settings
   it must resume from the newest committed checkpoint, finish, commit final/ and publish one Hub commit.
   The adapter pulled back from the Hub with stock peft must give the local adapter's logits exactly.

Prints a report (markdown) and writes it to DIR/GPU_E2E.md; exits 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

REPO, TOKEN = "alice/persona-gpu-e2e", "hf_alice_write"
SAMPLE = ROOT / "data" / "persona_sample.jsonl"


class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.failed = 0

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def check(self, ok: bool, what: str) -> bool:
        self.say(f"- [{'x' if ok else ' '}] {what}")
        self.failed += not ok
        return ok


def numerics_batch() -> list[dict]:
    """The numerics check's batch: 4 sequences of 211-498 random tokens, labels on their second halves."""
    import torch

    gen = torch.Generator().manual_seed(0)
    feats = []
    for n in (211, 347, 498, 260):
        ids = torch.randint(3, 1000, (n,), generator=gen).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return feats


def loss_and_grads(model_dir: Path, feats: list[dict], device: str = "cuda", lora_b_std: float = 0.02, **env):
    """Loss and LoRA gradients of one batch through the job's loading path with the settings `env` (LoRA on all
    linears, dropout 0), with compiled and recomputed layers set up as job/run.py sets them up (the Trainer enables
    the checkpointing): (loss, flattened float32 gradients, speed plan, batch shape)."""
    import torch

    from job.config import from_env
    from job.model import add_lora, load_base_model, load_tokenizer, speed_plan
    from job.speed import recompute
    from job.speed.attention import data_collator
    from job.speed.kernels import compile_layers
    from job.speed.recompute import checkpoint_kwargs

    config = from_env({"BASE_MODEL": str(model_dir), "LORA_DROPOUT": "0", "LORA_TARGET_MODULES": "all-linear",
                       "REQUIRE_GPU": str(device == "cuda").lower(), **env})
    tokenizer = load_tokenizer(config)
    plan = speed_plan(config, device)
    torch.manual_seed(0)
    model = add_lora(config, load_base_model(config, tokenizer, device, plan), tokenizer)
    # LoRA B starts at zero, so give it values: the gradients of A then depend on the attention too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, lora_b_std, generator=torch.Generator(p.device).manual_seed(1))
    torch._dynamo.reset()
    if plan.torch_compile:
        compile_layers(model, recomputed=plan.recompute in ("layers", "offload"), keep_weights=plan.keep_weights)
    if plan.gradient_checkpointing:
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(plan.recompute))
        recompute.use(model, plan.recompute)
    items = sum(sum(1 for x in f["labels"][1:] if x != -100) for f in feats)
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in data_collator(plan, tokenizer)(feats).items()}
    loss = model(**batch, num_items_in_batch=torch.tensor(items, device=device)).loss
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters()
                       if p.requires_grad and "lora_" in n])
    shape = tuple(batch["input_ids"].shape)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return loss.item(), grads, plan, shape


def numerics(model_dir: Path, report: Report) -> None:
    """Loss and LoRA gradients of one batch: padding-free vs padded, Liger vs unfused, and compiled layers with and
    without recomputation, in bf16."""
    import functools

    loss_and_grads_of = functools.partial(loss_and_grads, model_dir, numerics_batch())

    reference = loss_and_grads_of(PADDING_FREE="false", USE_LIGER_KERNEL="false", COMPUTE_DTYPE="float32")
    variants = {
        "padded, unfused (the seed's layout)": loss_and_grads_of(PADDING_FREE="false", USE_LIGER_KERNEL="false"),
        "padding-free, unfused": loss_and_grads_of(PADDING_FREE="true", USE_LIGER_KERNEL="false"),
        "padding-free, whole layers recomputed (eager)": loss_and_grads_of(
            PADDING_FREE="true", USE_LIGER_KERNEL="false", GRADIENT_CHECKPOINTING="true"),
        "padding-free, recomputed from host memory (eager)": loss_and_grads_of(
            PADDING_FREE="true", USE_LIGER_KERNEL="false", GRADIENT_CHECKPOINTING="offload"),
        "padding-free, compiled (TORCH_COMPILE=true)": loss_and_grads_of(PADDING_FREE="true", TORCH_COMPILE="true",
                                                                      GRADIENT_CHECKPOINTING="false"),
        "padding-free, compiled, whole layers recomputed": loss_and_grads_of(
            PADDING_FREE="true", TORCH_COMPILE="true", GRADIENT_CHECKPOINTING="true"),
        "padding-free, compiled, recomputed from host memory": loss_and_grads_of(
            PADDING_FREE="true", TORCH_COMPILE="true", GRADIENT_CHECKPOINTING="offload"),
    }

    # LoRA dropout 0.1 (the seed's): a whole recomputed layer's forward runs without gradients, a graph of its own
    # when compiled, and its recomputation with them; both must draw the masks the layer without recomputation
    # draws (inductor generates its random numbers in its own kernels; `fallback_random` draws them with eager's).
    # LoRA B ~ N(0, 1) here, so that LoRA's output, and with it the masks, dominates each layer's: different masks
    # then move the loss and gradients far more than the two graphs' rounding does (the dropout-0 pairs).
    import torch._inductor.config as inductor_config
    dropout = {}
    for rate, random in (("0", "inductor"), ("0.1", "inductor"), ("0.1", "fallback_random")):
        inductor_config.fallback_random = random == "fallback_random"
        for label, setting in (("compiled", "false"), ("compiled, whole layers recomputed", "true")):
            dropout[f"{label}, dropout {rate} ({random})"] = loss_and_grads_of(
                PADDING_FREE="true", USE_LIGER_KERNEL="false", LORA_DROPOUT=rate, TORCH_COMPILE="true",
                GRADIENT_CHECKPOINTING=setting, lora_b_std=1.0)
        inductor_config.fallback_random = False
    for label, setting in (("eager", "false"), ("eager, whole layers recomputed", "true")):
        dropout[f"{label}, dropout 0.1"] = loss_and_grads_of(
            PADDING_FREE="true", USE_LIGER_KERNEL="false", LORA_DROPOUT="0.1", TORCH_COMPILE="false",
            GRADIENT_CHECKPOINTING=setting, lora_b_std=1.0)
    # Last: Liger patches transformers' Llama classes for the rest of the process, and dynamo cannot trace
    # its kernels (the compiled variants failed after it, 2026-11-30 00:46 UTC).
    variants["padding-free + Liger (eager)"] = loss_and_grads_of(PADDING_FREE="true", USE_LIGER_KERNEL="true",
                                                                 TORCH_COMPILE="false")

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    report.say("### Numerics on this GPU: one batch of 4 sequences (211-498 tokens), LoRA on all linears")
    report.say(f"reference: padded, float32 compute, batch {reference[3]}, loss {reference[0]:.6f}")
    report.say("| bfloat16 variant | batch shape | attention | loss | loss error | LoRA gradient error |")
    report.say("|---|---|---|---|---|---|")
    errors = {}
    for name, (loss, grads, plan, shape) in variants.items():
        errors[name] = (abs(loss - reference[0]), rel(grads, reference[1]))
        report.say(f"| {name} | {shape} | {plan.attn_implementation} | {loss:.6f} | {errors[name][0]:.2e} | "
                   f"{errors[name][1]:.2e} |")
    base = errors["padded, unfused (the seed's layout)"]
    for name in list(variants)[1:]:
        ok = errors[name][0] <= 2 * base[0] + 5e-3 and errors[name][1] <= 1.5 * base[1] + 5e-3
        report.check(ok, f"{name}: as close to float32 as the padded bfloat16 batch is (bfloat16 tolerance)")
    # Eager recomputation runs the same kernels again on the same inputs: the gradients of the run without it, to
    # the GPU's run-to-run noise (two identical whole-layer recomputed calls in one process differed by 7.2e-4,
    # bench/offload_check.py, 2026-11-30 01:01 UTC; a wrong recomputation is off by the size of the gradient).
    # Compiled recomputation runs the forward pass in the no-gradient graph and the recomputation in the training
    # graph: inductor fuses those two differently, so their bfloat16 rounding differs as the compiled layers' does
    # from the eager ones'; in this small random model that rounding moves the LoRA gradients by 10^-2 relative
    # (its bfloat16 gradients are 0.88 off float32's). Tolerance there: what compiling itself moves them by.
    compiled, eager = variants["padding-free, compiled (TORCH_COMPILE=true)"], variants["padding-free, unfused"]
    compiled_apart, compiled_loss = rel(compiled[1], eager[1]), abs(compiled[0] - eager[0])
    report.say(f"compiled against eager layers (bfloat16 rounding of two fusions): LoRA gradients {compiled_apart:.2e} "
               f"relative, loss {compiled_loss:.2e}")
    for without, name in (("padding-free, unfused", "padding-free, whole layers recomputed (eager)"),
                          ("padding-free, unfused", "padding-free, recomputed from host memory (eager)"),
                          ("padding-free, compiled (TORCH_COMPILE=true)",
                           "padding-free, compiled, whole layers recomputed"),
                          ("padding-free, compiled (TORCH_COMPILE=true)",
                           "padding-free, compiled, recomputed from host memory")):
        apart = rel(variants[name][1], variants[without][1])
        loss_apart = abs(variants[name][0] - variants[without][0])
        grad_tol, loss_tol = (1e-2, 1e-3) if "eager" in name else (max(1e-2, 1.5 * compiled_apart),
                                                                      max(1e-3, 1.5 * compiled_loss))
        report.check(loss_apart <= loss_tol and apart <= grad_tol,
                     f"{name}: the loss and LoRA gradients of `{without}` (relative difference {apart:.2e}, "
                     f"tolerance {grad_tol:.1e}; loss {loss_apart:.2e}, tolerance {loss_tol:.1e})")
    report.say("| LoRA dropout, LoRA B ~ N(0, 1) | loss | LoRA gradient norm |")
    report.say("|---|---|---|")
    for name, (loss, grads, _, _) in dropout.items():
        report.say(f"| {name} | {loss:.6f} | {grads.norm().item():.6e} |")

    def apart(a, b):
        return rel(dropout[a][1], dropout[b][1]), abs(dropout[a][0] - dropout[b][0])
    rounding = apart("compiled, whole layers recomputed, dropout 0 (inductor)", "compiled, dropout 0 (inductor)")
    masks = apart("compiled, dropout 0.1 (fallback_random)", "compiled, dropout 0.1 (inductor)")
    report.say(f"the two graphs' rounding (dropout 0): gradients {rounding[0]:.2e}, loss {rounding[1]:.2e}; "
               f"different masks (inductor's against eager's random, dropout 0.1): gradients {masks[0]:.2e}, "
               f"loss {masks[1]:.2e}")
    for random in ("inductor", "fallback_random"):
        got = apart(f"compiled, whole layers recomputed, dropout 0.1 ({random})", f"compiled, dropout 0.1 ({random})")
        report.check(got[0] <= 2 * rounding[0] + 1e-3 and got[0] <= masks[0] / 10 and got[1] <= 2 * rounding[1] + 1e-3,
                     f"compiled whole layers recomputed, dropout 0.1 ({random}): the masks of the layer without "
                     f"recomputation (gradients {got[0]:.2e} apart, loss {got[1]:.2e}: the graphs' rounding, not "
                     f"different masks)")
    got = apart("eager, whole layers recomputed, dropout 0.1", "eager, dropout 0.1")
    report.check(got[0] <= 1e-2 and got[1] <= 1e-3, f"eager whole layers recomputed, dropout 0.1: the masks of the "
                                                    f"layer without recomputation (gradients {got[0]:.2e} apart, "
                                                    f"loss {got[1]:.2e})")


def job_env(model_dir: Path, work: Path, moto, hub) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_", "HUGGING", "E2E_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(moto.env())
    env = hub.subprocess_env(hf_home=work / "hf", token=TOKEN, base=env)
    env.update({
        "BASE_MODEL": str(model_dir), "DATASET": str(SAMPLE), "NUM_SAMPLES": "0",
        "MAX_STEPS": "300", "SAVE_STEPS": "25", "LOGGING_STEPS": "5", "EVAL_STEPS": "100",
        "CHECKPOINT_URI": "s3://gpu-e2e/runs", "OUTPUT_DIR": str(work / "out"), "HUB_MODEL_ID": REPO,
        "LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1",
        # E2E_TORCH_COMPILE=true runs the compiled layers through the stop, the resume and the publish.
        "TORCH_COMPILE": os.environ.get("E2E_TORCH_COMPILE", "auto"),
    })
    if DEVICE == "cpu":
        env["REQUIRE_GPU"] = "false"
    return env


def events(lines: list[str], name: str | None = None) -> list[dict]:
    out = []
    for line in lines:
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
    return out


def run_and_stop(env, log: Path) -> tuple[int, list[str], float]:
    """Start the job; SIGTERM it once a checkpoint is committed; return its exit code and stdout lines."""
    proc = subprocess.Popen([sys.executable, "-m", "job", "train"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=log.open("w"))
    lines, signalled = [], None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        event = events(lines[-1:])
        if signalled is None and event and event[0].get("event") == "checkpoint" and \
                event[0].get("message", "").startswith("committed step"):
            proc.send_signal(signal.SIGTERM)
            signalled = time.time()
    code = proc.wait()
    return code, lines, time.time() - (signalled or time.time())


def run_job(env, log: Path, *args: str) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "job", *(args or ("train",))], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=log.open("w"), timeout=900)
    return proc.returncode, proc.stdout.splitlines()


def end_to_end(model_dir: Path, work: Path, report: Report) -> None:
    from fakes.hub import DEFAULT_TOKENS, HubServer
    from fakes.s3 import start_moto

    moto = start_moto()
    moto.make_bucket("gpu-e2e")
    hub = HubServer(DEFAULT_TOKENS)
    hub.start()
    try:
        env = job_env(model_dir, work, moto, hub)
        report.say("\n### Preflight: `python -m job preflight` (S3 on moto, the local Hub endpoint)")
        started = time.time()
        code, lines = run_job(env, work / "preflight.stderr", "preflight")
        checks = [e for e in events(lines, "preflight") if "check" in e]
        for check in checks:
            report.say(f"- {check['check']}: {check['status']} - {check['message']}")
        report.check(code == 0 and bool(checks), f"preflight passed every check in {time.time() - started:.1f} s")
        report.say("\n### The run: `python -m job train`, SIGTERM after the first committed checkpoint, restart")
        started = time.time()
        code, first, stop_seconds = run_and_stop(env, work / "first.stderr")
        speed = events(first, "speed")
        if speed:
            report.say(f"speed plan chosen on this GPU: {json.dumps({k: v for k, v in speed[0].items() if k not in ('time', 'event', 'message')})}")
        committed = [e["step"] for e in events(first, "checkpoint") if e.get("message", "").startswith("committed")]
        stopped = events(first, "stopped")
        last_progress = [e["step"] for e in events(first, "progress")]
        report.say(f"first start: exit {code} after {time.time() - started:.1f} s; progress up to step "
                   f"{max(last_progress, default=0)}; committed steps {committed}; "
                   f"{stop_seconds:.1f} s from SIGTERM to exit; stop message: "
                   f"{stopped[0]['message'] if stopped else (first[-1:] or ['?'])[0]}")
        report.check(code == 75, "SIGTERM: the job saved, committed and exited 75")
        if code != 75:
            report.say("stderr tail: " + " | ".join((work / "first.stderr").read_text().splitlines()[-5:]))
        _, status_lines = run_job(env, work / "status.stderr", "status", "--json")
        status = json.loads("\n".join(status_lines) or "{}")
        report.say(f"`python -m job status` between the runs: {json.dumps(status)[:400]}")
        newest = max(committed, default=None)

        started = time.time()
        code, second = run_job(env, work / "second.stderr")
        resumed = events(second, "resume")
        progress = [e["step"] for e in events(second, "progress")]
        done = events(second, "done")
        report.say(f"second start: exit {code} after {time.time() - started:.1f} s; resume events: "
                   f"{[e['message'] for e in resumed]}; progress steps {progress[:3]} ... {progress[-2:]}")
        report.check(code == 0, "the restarted run finished (exit 0)")
        if code != 0:
            report.say("stderr tail: " + " | ".join((work / "second.stderr").read_text().splitlines()[-8:]))
        resumed_step = next((e.get("step") for e in resumed if "step" in e), None)
        report.check(resumed_step is not None and resumed_step >= (newest or 0) and bool(progress)
                     and progress[0] > resumed_step,
                     f"it resumed from committed step {resumed_step} (newest committed before SIGTERM: {newest}) "
                     f"and did not retrain steps before it")
        report.check(bool(progress) and progress[-1] == 300, "it trained to MAX_STEPS=300")
        files = hub.files(REPO) if REPO in {k for k in getattr(hub, "repos", {})} else {}
        commits = [c for c in hub.commits(REPO) if c["message"].startswith("persona-qlora run ")] if files else []
        url = done[-1].get("hub_commit_url") if done else None
        report.say(f"Hub: {len(commits)} run commit(s) on {REPO}; files {sorted(files)}; commit URL {url}")
        out = work / "out"
        report.check(len(commits) == 1 and "adapter_model.safetensors" in files and
                     files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes(),
                     "published: one commit on the local Hub endpoint, adapter identical to the local one")
        summary = json.loads((out / "training_summary.json").read_text())
        report.say(f"training_summary.json: steps {summary['steps']}, device {summary['device']}, "
                   f"tokens/s {summary['tokens_per_second']}, final eval loss {summary['final_eval_loss']}")
        evaluation = summary.get("evaluation") or {}
        base, tuned = evaluation.get("base", {}), evaluation.get("tuned", {})
        report.say(f"persona evaluation on {evaluation.get('heldout_rows')} held-out rows "
                   f"({evaluation.get('generated_rows')} answered greedily): base {base}; tuned {tuned}; "
                   f"first sample: {json.dumps((evaluation.get('samples') or [None])[0])[:400]}")
        report.check(bool(tuned) and tuned["loss"] < base["loss"] and "reply_f1" in tuned,
                     "evaluation: the tuned adapter's held-out reply loss is below the base model's, with reply F1")
        import importlib.util
        if importlib.util.find_spec("matplotlib") is not None:
            report.check((out / "loss_curve.png").exists(), "loss_curve.png written")
        same_logits(model_dir, out, hub, env, report)
    finally:
        hub.stop()
        moto.stop()


def same_logits(model_dir: Path, out: Path, hub, env, report: Report) -> None:
    """A user's load: stock peft, from the Hub endpoint and from the local folder, on this GPU."""
    script = f"""
import json, torch
from peft import PeftModel
from transformers import AutoTokenizer
from job.config import from_env
from job.model import load_base_model
config = from_env({{"BASE_MODEL": "{model_dir}"}})
tokenizer = AutoTokenizer.from_pretrained("{REPO}")
batch = tokenizer(["<persona_b>I keep bees.</persona_b> [INST] Hello [/INST]"], return_tensors="pt").to("{DEVICE}")
def logits(source):
    model = PeftModel.from_pretrained(load_base_model(config, tokenizer, "{DEVICE}"), source).eval()
    with torch.no_grad():
        return model(**batch).logits
hub, local = logits("{REPO}"), logits("{out}")
print(json.dumps({{"equal": bool(torch.equal(hub, local)), "shape": list(hub.shape)}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    report.check(result.get("equal") is True,
                 f"stock peft: the adapter pulled from the Hub gives the local adapter's logits exactly "
                 f"{result or proc.stderr.strip().splitlines()[-1:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true", help="check this script on a CPU (skips the GPU numerics)")
    parser.add_argument("--numerics-only", action="store_true", help="only the numerics check")
    args = parser.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.cpu else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from job.tiny import build_tiny_model

    report = Report()
    report.say(f"GPU end to end on {torch.cuda.get_device_name(0) if DEVICE == 'cuda' else 'cpu'}, "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    model_dir = build_tiny_model(work / "model", layers=4, hidden=256)
    steps = (numerics, end_to_end) if DEVICE == "cuda" else (end_to_end,)
    for step in steps[:1] if args.numerics_only else steps:
        try:
            step(model_dir, report) if step is numerics else step(model_dir, work, report)
        except Exception as exc:  # noqa: BLE001 - report it and go on to the next check
            import traceback
            report.check(False, f"{step.__name__} raised {type(exc).__name__}: {exc}")
            report.say("```\n" + traceback.format_exc()[-2000:] + "```")
    report.say(f"\n{'ALL CHECKS PASSED' if not report.failed else f'{report.failed} CHECK(S) FAILED'}")
    (args.out / "GPU_E2E.md").write_text("\n".join(report.lines) + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
