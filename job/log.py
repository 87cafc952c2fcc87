"""What the job says while it runs: a progress bar on a terminal, JSON lines in a pod's log.

Every line goes through `Reporter`, which masks the run's secrets, so no token or key reaches a log.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

MASK = "***"


class Reporter:
    def __init__(self, mode: str = "auto", secrets: list[str] | None = None, stream: TextIO | None = None,
                 quiet: bool = False):
        self.stream = stream or sys.stdout
        self.quiet = quiet   # ranks other than 0 of a multi-GPU run: errors only
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "json"
        self.mode = mode
        self.secrets = [s for s in (secrets or []) if s]
        self._bar = None
        # Reentrant: the signal handler reports from the main thread, perhaps while that thread is writing.
        self._lock = threading.RLock()

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def _write(self, text: str) -> None:
        if self.quiet:
            return
        text = self._mask(text)
        # The uploader thread reports commits while the training thread reports progress: one line, one write.
        with self._lock:
            if self._bar is not None:
                self._bar.write(text, file=self.stream)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def event(self, event: str, message: str = "", **fields: Any) -> None:
        """A milestone (loaded, resumed, committed, ...): one line of text or JSON."""
        if self.mode == "json":
            self._write(json.dumps({"time": _now(), "event": event, "message": message, **fields}, default=str))
        else:
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            self._write(f"[{event}] {message} {extra}".rstrip())

    def text(self, text: str) -> None:
        """Preformatted lines (a table), masked like every other line."""
        for line in text.splitlines():
            self._write(line)

    def error(self, message: str) -> None:
        """A failure the user must fix: one clear line on stderr (several problems: one `error:` line each)."""
        self.close_progress()
        for line in self._mask(message).splitlines() or [""]:
            print(f"error: {line}", file=sys.stderr, flush=True)

    def warning(self, message: str) -> None:
        """Something the user should know but need not fix to go on: one `warning:` line on stderr."""
        self.close_progress()
        print(f"warning: {self._mask(message)}", file=sys.stderr, flush=True)

    def crash(self, phase: str, exc: BaseException, traceback: bool) -> None:
        """An error nothing in the job anticipated: one line naming the phase and the error, secrets masked; before
        it, at LOG_LEVEL=debug, the traceback, masked too."""
        import traceback as tb

        self.close_progress()
        if traceback:
            print(self._mask("".join(tb.format_exception(exc))), end="", file=sys.stderr, flush=True)
        text = self._mask(" ".join(str(exc).split()))   # masked before it is cut short, never a piece of a secret
        text = f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__
        hint = "" if traceback else " (LOG_LEVEL=debug logs the traceback)"
        print(f"error: {phase} failed: {text}{hint}", file=sys.stderr, flush=True)

    def start_progress(self, total: int, initial: int = 0) -> None:
        if self.mode == "bar" and not self.quiet:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=self.stream,
                             dynamic_ncols=True)

    def progress(self, step: int, total: int, **fields: Any) -> None:
        """One logging step: step, loss, learning rate, tokens/s, ETA."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: _fmt(v) for k, v in fields.items()}, refresh=True)
        else:
            self._write(json.dumps({"time": _now(), "event": "progress", "step": step, "max_steps": total,
                                    **fields}, default=str))

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
