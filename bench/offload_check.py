"""GRADIENT_CHECKPOINTING=offload on a GPU, repeated: does recomputing from host memory give the gradients of
whole-layer recomputation every time? (bench/gpu_e2e.py's numerics saw 7.2e-4 and 3.1e-3 relative differences in
one run and 2.8e-6 in the next.) The numerics check's batch and loading path (eager layers); each variant runs
REPEATS times; `same-stream` copies to and from the host on the compute stream instead of recompute.py's copy
stream.

    python bench/offload_check.py OUT_DIR [--cpu]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

REPEATS = 4


def main(out: Path, device: str) -> None:
    import torch

    import job.speed.recompute as recompute
    from gpu_e2e import loss_and_grads, numerics_batch
    from job.tiny import build_tiny_model

    model_dir = build_tiny_model(out / "model", layers=4, hidden=256)
    feats = numerics_batch()

    def grads(setting: str) -> torch.Tensor:
        return loss_and_grads(model_dir, feats, device, PADDING_FREE="true", USE_LIGER_KERNEL="false",
                              TORCH_COMPILE="false", GRADIENT_CHECKPOINTING=setting)[1]

    reference = grads("true")
    lines = [f"whole layers again: {((grads('true') - reference).norm() / reference.norm()).item():.2e}"]
    for label in ("copy stream", "same-stream"):
        if label == "same-stream":
            recompute._copy_stream = lambda device: torch.cuda.current_stream(device)
        for i in range(REPEATS):
            apart = ((grads("offload") - reference).norm() / reference.norm()).item()
            lines.append(f"offload, {label}, run {i + 1}: {apart:.2e}")
    text = "\n".join(lines)
    print(text)
    (out / "offload_check.txt").write_text(text + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), "cpu" if "--cpu" in sys.argv[2:] else "cuda")
