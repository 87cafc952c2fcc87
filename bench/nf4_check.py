"""On the GPU: the compiled layers' NF4 dequantization (job/speed/nf4.py, inductor's kernels) against bitsandbytes'
CUDA kernels, on the 7B's weight shapes, with and without DOUBLE_QUANT: equal bit for bit? and each one's time.
Then NF4Linear's product and input gradient against bitsandbytes' matmul_4bit.

    python bench/nf4_check.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def timed(fn, repeats: int = 50) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3      # microseconds


def main(out: Path) -> int:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch
    import torch._dynamo.config as dynamo_config

    from job.speed import nf4

    dynamo_config.cache_size_limit = 64     # a compile per shape and variant, beyond dynamo's default of 8
    rows, failures = [], 0
    for double_quant in (False, True):
        for shape in SHAPES:
            torch.manual_seed(0)
            layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=double_quant)
            layer.weight = bnb.nn.Params4bit(torch.randn(shape, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                             quant_type="nf4", compress_statistics=double_quant)
            layer = layer.cuda()
            weight, state = layer.weight, layer.weight.quant_state
            theirs = bnbf.dequantize_4bit(weight, state)
            ours_fn = torch.compile(lambda: nf4.dequantize(weight, state, torch.bfloat16))
            ours = ours_fn()
            back_fn = torch.compile(lambda: nf4.dequantize(weight, state, torch.bfloat16, for_backward=True))
            differ = int((ours != theirs).sum()) + int((back_fn() != theirs).sum())

            nf4.use(layer)
            x = torch.randn(1400, shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn(1400, shape[0], device="cuda", dtype=torch.bfloat16)
            expected = bnb.matmul_4bit(x, weight.t(), quant_state=state)
            expected.backward(grad)
            expected_grad, x.grad = x.grad, None
            product = torch.compile(layer, dynamic=True)(x)
            product.backward(grad)
            product_equal, grad_equal = torch.equal(product, expected), torch.equal(x.grad, expected_grad)
            failures += bool(differ) + (not product_equal) + (not grad_equal)
            rows.append({"shape": list(shape), "double_quant": double_quant, "values_differing": differ,
                         "product_equal": product_equal, "input_grad_equal": grad_equal,
                         "bitsandbytes_us": round(timed(lambda: bnbf.dequantize_4bit(weight, state)), 1),
                         "compiled_us": round(timed(ours_fn), 1)})
            print(json.dumps(rows[-1]), flush=True)
    (out / "nf4_check.json").write_text(json.dumps(rows, indent=1))
    print("NF4 CHECK:", "ALL EQUAL" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
