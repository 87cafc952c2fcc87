"""The optimizer step alone on the GPU: bitsandbytes' paged AdamW 32-bit (the seed's `paged_adamw_32bit`) over the
job's trainable parameters (LoRA r64 on q_proj and v_proj of Llama-2-7B's 32 layers: 128 float32 matrices of
64x4096 or 4096x64), in variants:
- bnb: bitsandbytes' own step (a wait for the GPU after each parameter), the reference;
- paged: the job's step (kernels.without_per_parameter_syncs: no waits, each update's kernel called directly), the
  states in CUDA managed memory, prefetched to the GPU before each parameter's update (a fresh run without the
  speed plan's optimizer_states_on_gpu);
- paged-noprefetch: the same states, not prefetched (the prefetch is a hint: the update's kernel reads managed
  memory wherever it is);
- device: the job's step, the states in the GPU's own memory (the plan's optimizer_states_on_gpu; what a resumed
  run has: bitsandbytes' load_state_dict moves them there);
- device-update-step: the same, each update through bitsandbytes' update_step (its Python and operator dispatch)
  rather than its kernel called directly;
- torch-fused: torch's fused AdamW, for reference (the same algorithm, other kernels; weight decay applied before
  the update, where bitsandbytes applies it after).

    python bench/optim_check.py [--steps 80] [--variants ...] [--out results.json]

For each: the host's time to queue a step, the GPU's time a step (CUDA events around the queued steps), and the
parameters after the steps against the first variant's (the same gradients every variant): bitwise for the
bitsandbytes variants, the largest difference for torch's."""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYERS, HIDDEN, RANK = 32, 4096, 64
SETTINGS = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.001)


def parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(RANK, HIDDEN), (HIDDEN, RANK)] * (2 * LAYERS)
    return [torch.nn.Parameter(torch.randn(*shape, device="cuda", generator=generator) * 0.01) for shape in shapes]


def gradients(params, step: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=generator) * 1e-3


def optimizer(name: str, params):
    import bitsandbytes as bnb

    from job.speed.kernels import states_on_gpu, without_per_parameter_syncs

    if name == "torch-fused":
        return torch.optim.AdamW(params, fused=True, **SETTINGS)
    opt = bnb.optim.PagedAdamW32bit(params, **SETTINGS)
    if name == "bnb":
        return opt
    if name.startswith("device"):
        assert states_on_gpu(opt)
    without_per_parameter_syncs(opt)
    if name == "paged-noprefetch":
        opt.prefetch_state = types.MethodType(lambda self, p: None, opt)
    if name == "device-update-step":
        opt._job_adam_32bit = None   # kernels._adam_32bit's cache: none, so update_step
    return opt


def run(name: str, steps: int) -> tuple[dict, list[torch.Tensor]]:
    params = parameters()
    opt = optimizer(name, params)
    warm = 5
    for step in range(warm):
        gradients(params, step)
        opt.step()
    torch.cuda.synchronize()
    # Gradients made before the timed steps, so that only the optimizer's work is timed.
    grads = []
    for step in range(warm, steps):
        gradients(params, step)
        grads.append([p.grad for p in params])
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = []
    start.record()
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        queued = time.perf_counter()
        opt.step()
        host.append(time.perf_counter() - queued)
    end.record()
    torch.cuda.synchronize()
    timed = len(grads)
    state = opt.state[params[0]]
    where = {k: (v.device.type + (" managed" if getattr(v, "is_paged", False) else ""))
             for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel() > 1}
    result = {"variant": name, "steps": timed, "gpu_ms_per_step": round(start.elapsed_time(end) / timed, 3),
              "host_ms_per_step": round(1000 * sorted(host)[len(host) // 2], 3), "states": where,
              "kernel_called_directly": getattr(opt, "_job_adam_32bit", None) is not None}
    return result, [p.detach().clone() for p in params]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", default="bnb,paged,paged-noprefetch,device,device-update-step,torch-fused,bnb")
    parser.add_argument("--out")
    args = parser.parse_args()
    results, reference = [], None
    for name in args.variants.split(","):
        result, final = run(name, args.steps)
        if reference is None:
            reference = final
        else:
            diff = max((a - b).abs().max().item() for a, b in zip(final, reference))
            result["max_abs_diff_vs_first"] = diff
            result["bitwise_equal_to_first"] = all(torch.equal(a, b) for a, b in zip(final, reference))
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
