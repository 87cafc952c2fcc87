"""GRADIENT_CHECKPOINTING=offload on a GPU, repeated: does recomputing from host memory give the gradients of
whole-layer recomputation every time? (bench/gpu_e2e.py's numerics saw 7.2e-4 and 3.1e-3 relative differences in
one run and 2.8e-6 in the next.) Each variant runs REPEATS times on one batch; `same-stream` copies to and from
the host on the compute stream instead of recompute.py's copy stream.

    python bench/offload_check.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REPEATS = 4


def main(out: Path) -> None:
    import torch

    import job.speed.recompute as recompute
    from job.config import from_env
    from job.model import add_lora, load_base_model, load_tokenizer, speed_plan
    from job.speed.attention import data_collator
    from job.tiny import build_tiny_model

    model_dir = build_tiny_model(out / "model", layers=4, hidden=256)
    gen = torch.Generator().manual_seed(0)
    feats = []
    for n in (211, 347, 498, 260):
        ids = torch.randint(3, 1000, (n,), generator=gen).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})

    def grads(setting: str) -> torch.Tensor:
        config = from_env({"BASE_MODEL": str(model_dir), "LORA_DROPOUT": "0", "LORA_TARGET_MODULES": "all-linear",
                           "PADDING_FREE": "true", "USE_LIGER_KERNEL": "false", "TORCH_COMPILE": "false",
                           "GRADIENT_CHECKPOINTING": setting})
        tokenizer = load_tokenizer(config)
        plan = speed_plan(config, "cuda")
        torch.manual_seed(0)
        model = add_lora(config, load_base_model(config, tokenizer, "cuda", plan), tokenizer)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator(p.device).manual_seed(1))
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        recompute.use(model, plan.recompute)
        batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in data_collator(plan, tokenizer)(feats).items()}
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        g = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters()
                       if p.requires_grad and "lora_" in n])
        del model
        torch.cuda.empty_cache()
        return g

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
    main(Path(sys.argv[1]))
