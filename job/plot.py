"""The loss curve (train and held-out eval loss by step) as a PNG beside the summary and in the model card."""
from __future__ import annotations

from pathlib import Path

LOSS_CURVE = "loss_curve.png"


def prepare() -> None:
    """matplotlib imported ahead (about half a second), where the run would otherwise wait; nothing if it is
    missing (`loss_curve` says so)."""
    try:
        import matplotlib
        matplotlib.use("Agg")   # no display in a container
        import matplotlib.figure  # noqa: F401
    except ImportError:
        pass


def loss_curve(summary: dict, path: Path) -> Path | None:
    """Draw the curve of `training_summary.json`'s losses; None when there is nothing to draw."""
    train = [(e["step"], e["loss"]) for e in summary.get("train_loss", [])]
    evals = [(e["step"], e["loss"]) for e in summary.get("eval_loss", [])]
    if not train and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")   # no display in a container
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    ax = figure.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals), label="eval loss (held-out conversations)", color="#d62728", marker="o",
                linewidth=1.5)
    base = (summary.get("evaluation") or {}).get("base", {}).get("loss")
    if base is not None:
        ax.axhline(base, color="#7f7f7f", linestyle="--", linewidth=1, label="base model, held-out reply loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (Persona B's reply tokens)")
    ax.set_title(f"{summary.get('run_id', '')}: loss by step")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
