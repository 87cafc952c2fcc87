"""`python -m job status` in words: status.json as a short aligned block a person reads at a glance."""
from __future__ import annotations

from datetime import datetime, timezone


def render_status(status: dict, committed: list[int]) -> str:
    return "\n".join(f"{label:<10} {value}" for label, value in status_lines(status, committed))


def status_lines(status: dict, committed: list[int]) -> list[tuple[str, str]]:
    """The human form of status.json: (label, text) rows; absent fields show as '-' or not at all."""
    rows = []
    attempt = f" (attempt {status['attempt']})" if status.get("attempt") else ""
    rows.append(("run", f"{status.get('run_id', '-')}{attempt}"))
    phase, step, max_steps = status.get("phase", "-"), status.get("step"), status.get("max_steps")
    if step is not None:
        phase += f", step {step}"
        if max_steps:
            phase += f" of {max_steps} ({int(100 * step / max_steps)}%)"
    if status.get("stopped_by"):
        phase += f", stopped by {status['stopped_by']}"
    rows.append(("phase", phase))
    if status.get("error"):
        rows.append(("error", str(status["error"])))
    loss = _number(status.get("last_loss"), 4)
    if status.get("eval_loss") is not None:
        loss += f" (eval {_number(status['eval_loss'], 4)})"
    rows.append(("loss", loss))
    speed = f"{_number(status.get('tokens_per_second'), 0)} tokens/s" if status.get("tokens_per_second") else "-"
    if status.get("phase") == "training" and status.get("eta_seconds") is not None and not status.get("stopped_by"):
        speed += f", ETA {_duration(status['eta_seconds'])}"
    rows.append(("speed", speed))
    if committed:
        rows.append(("checkpoint", f"step {committed[-1]} committed (committed: {', '.join(map(str, committed))})"))
    else:
        rows.append(("checkpoint", "none committed"))
    rows.extend(_evaluation_rows(status.get("evaluation"), step))
    if status.get("updated_at"):
        rows.append(("updated", _when(status["updated_at"])))
    if status.get("hub_commit_url"):
        rows.append(("hub", status["hub_commit_url"]))
    return rows


def _evaluation_rows(evaluation, step) -> list[tuple[str, str]]:
    """One row per evaluated model, whether stored nested ({"base": {"loss": ..}}) or flat ({"base_loss": ..})."""
    if not isinstance(evaluation, dict):
        return []
    models = {key: value for key, value in evaluation.items() if isinstance(value, dict)}
    if not models:
        for key, value in evaluation.items():
            if "_" in key:
                model, figure = key.split("_", 1)
                models.setdefault(model, {})[figure] = value
    at = f" (step {evaluation['step']})" if evaluation.get("step") not in (None, step) else ""
    rows = []
    for model, figures in models.items():
        shown = [f"{name} {_number(value, 4)}" for name, value in figures.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if shown:
            rows.append((f"eval {model}", ", ".join(shown) + at))
    return rows


def _number(value, decimals: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or decimals == 0:
        return f"{round(value):,}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.{decimals}f}"   # a perplexity of 2,267.4


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _when(stamp: str) -> str:
    try:
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return stamp
    ago = (datetime.now(timezone.utc) - at).total_seconds()
    return f"{at:%Y-%m-%d %H:%M:%S} UTC ({'just now' if ago < 1 else _duration(ago) + ' ago'})"
