"""On the GPU: a compiled layer's seven 4-bit linears (Llama-2-7B's shapes) through bitsandbytes' operators, which
dequantize each weight in the forward pass and again in the backward pass, against the same layer with each weight
dequantized once, in bf16, and that copy used by every pass (nf4.keep): the product and input gradient
(equal? each one's largest error against a float32 computation with the same dequantized weights, relative to that
computation's largest value), and the time of a forward and backward pass at a batch-4 and a batch-32 step's tokens.
On a GPU the two may differ in the last bits (inductor hands cuBLAS the product in another form, and cuBLAS picks its
kernel by form); the check passes when keeping is no less accurate than bitsandbytes' path (errors at most 1.25x).

    python bench/kept_check.py OUT_DIR [--cpu-smoke]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096), "gate": (4096, 11008),
          "up": (4096, 11008), "down": (11008, 4096)}          # (in, out)
TOKENS = (1445, 10734)      # the bench's mean tokens a step at batch 4 and batch 32


def main(out: Path, cpu: bool = False) -> int:
    import bitsandbytes as bnb
    import torch

    from job.speed import nf4

    device, backend = ("cpu", "aot_eager") if cpu else ("cuda", "inductor")
    scale = 64 if cpu else 1
    tokens_list = (7, 33) if cpu else TOKENS

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            for name, (cols, rows) in SHAPES.items():
                cols, rows = cols // scale, rows // scale
                linear = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
                linear.weight = bnb.nn.Params4bit(torch.randn(rows, cols, dtype=torch.bfloat16) * 0.02,
                                                  requires_grad=False, quant_type="nf4")
                setattr(self, name, linear)

        def forward(self, x, linear=None):
            linear = linear or (lambda name, x: getattr(self, name)(x))
            h = linear("o", linear("q", x) + linear("k", x) + linear("v", x))
            return linear("down", linear("gate", h) * linear("up", h))

    def reference(layer, x):
        """The same layer in float32, its weights bitsandbytes' dequantized ones: the product and input gradient."""
        import bitsandbytes.functional as bnbf

        weights = {name: bnbf.dequantize_4bit(getattr(layer, name).weight, getattr(layer, name).weight.quant_state)
                   .float() for name in SHAPES}
        x = x.detach().float().requires_grad_(True)
        y = layer.forward(x, lambda name, v: v @ weights[name].T)
        y.square().mean().backward()
        return y.detach(), x.grad

    def error(value, expected):
        return float((value.float() - expected).abs().max() / expected.abs().max())

    rows = []
    for tokens in tokens_list:
        results = {}
        for mode in ("bitsandbytes", "kept"):
            torch._dynamo.reset()
            layer = Layer().to(device)
            if mode == "kept":
                assert nf4.keep(layer) == len(SHAPES)
            compiled = torch.compile(layer, backend=backend, dynamic=True)
            x = torch.randn(tokens, 4096 // scale, device=device, dtype=torch.bfloat16, requires_grad=True)

            def step():
                x.grad = None
                compiled(x).float().square().mean().backward()

            for _ in range(3):
                step()
            if not cpu:
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(20):
                step()
            host = (time.perf_counter() - started) / 20
            if not cpu:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - started) / 20
            x.grad = None
            y = compiled(x)
            y.float().square().mean().backward()
            results[mode] = (y.detach(), x.grad.clone(), host, wall)
        y_ref, g_ref = reference(layer, x)
        (y0, g0, host0, wall0), (y1, g1, host1, wall1) = results.values()
        rows.append({"tokens": tokens, "bitsandbytes_ms": round(wall0 * 1e3, 3), "kept_ms": round(wall1 * 1e3, 3),
                     "bitsandbytes_host_ms": round(host0 * 1e3, 3), "kept_host_ms": round(host1 * 1e3, 3),
                     "product_equal": bool(torch.equal(y0, y1)), "gradient_equal": bool(torch.equal(g0, g1)),
                     "product_error": {"bitsandbytes": error(y0, y_ref), "kept": error(y1, y_ref)},
                     "gradient_error": {"bitsandbytes": error(g0, g_ref), "kept": error(g1, g_ref)}})
        print(json.dumps(rows[-1]), flush=True)
    (out / "kept_check.json").write_text(json.dumps(rows, indent=1))
    as_accurate = all(r[k]["kept"] <= 1.25 * r[k]["bitsandbytes"] + 1e-6 for r in rows
                      for k in ("product_error", "gradient_error"))
    return 0 if as_accurate else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), "--cpu-smoke" in sys.argv))
