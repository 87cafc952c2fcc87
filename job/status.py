"""status.json: the run's phase and progress, written as the run goes (`StatusWriter`) and read back in words by
`python -m job status` (`render_status`), a short aligned block a person reads at a glance."""
from __future__ import annotations

import enum
import threading
from datetime import datetime, timezone
from typing import Any, Callable


class Phase(enum.StrEnum):
    """The run's state machine, as status.json records it: training -> evaluating -> finalizing -> publishing ->
    done. Every other failure leaves the phase where it was, so a restart continues from there."""
    TRAINING = "training"
    EVALUATING = "evaluating"
    FINALIZING = "finalizing"
    PUBLISHING = "publishing"
    DONE = "done"
    FAILED = "failed"   # only the publish gate (PUBLISH_ONLY_IF_IMPROVED) leads here


class StatusWriter:
    """status.json, kept current from a background thread (a PUT per logging step must not stall training; the
    newest fields win). A failed write is reported, never fatal: status is advisory, the manifests are the truth."""

    def __init__(self, run_id: str, run_store, reporter, newest: Callable[[], int | None], enabled: bool = True):
        self.run_store, self.reporter, self.newest, self.enabled = run_store, reporter, newest, enabled
        self.fields: dict[str, Any] = {"run_id": run_id}
        previous = run_store.read_status() or {}
        self.fields["attempt"] = int(previous.get("attempt", 0)) + 1
        self._pending: dict[str, Any] | None = None
        self._changed = threading.Condition()
        self._writing = False
        if enabled:
            threading.Thread(target=self._work, name="status-writer", daemon=True).start()

    def write(self, **fields: Any) -> None:
        if not self.enabled:
            return
        with self._changed:
            self.fields.update(fields)
            if self.fields.get("phase") != Phase.TRAINING:
                self.fields.pop("eta_seconds", None)   # an estimate of the training left; none is left
            self.fields["newest_checkpoint"] = self.newest()
            self._pending = dict(self.fields)
            self._changed.notify_all()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the newest fields are written (bounded: a hung store must not hold up an exit)."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending is None and not self._writing, timeout)

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None)
                snapshot, self._pending, self._writing = self._pending, None, True
            try:
                self.run_store.write_status(snapshot)
            except Exception as exc:
                self.reporter.event("status", f"could not write status.json: {type(exc).__name__}")
            with self._changed:
                self._writing = False
                self._changed.notify_all()


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
    if status.get("phase") == Phase.TRAINING and status.get("eta_seconds") is not None and not status.get("stopped_by"):
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
