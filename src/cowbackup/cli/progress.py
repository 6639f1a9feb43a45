"""Rendering of job progress: a bar on a terminal, JSON lines for programs.

Progress is data (STYLE.md #24): the renderer receives ``(current, total)`` samples and job events and
decides how to show them.  ``--json`` prints one JSON object per line::

    {"type": "start", "job": "backup0", "total": 134217728}
    {"type": "progress", "job": "backup0", "current": 1048576, "total": 134217728, "rate": 5.2e8}
    {"type": "event", "event": "BLOCK_JOB_COMPLETED", "data": {...}}
    {"type": "result", "bytes": 134217728, "seconds": 0.25, "rate": 5.4e8, "allocated": 75497472}

``start`` comes first and ``result`` (on success) last; the last ``progress`` line is the final sample.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from rich.progress import TaskID

#: How often the CLI's backups refresh the progress display, in seconds.
PROGRESS_INTERVAL = 0.2


class Reporter(Protocol):
    def start(self, job_id: str, total: int) -> None: ...
    def update(self, current: int, total: int, *, force: bool = False) -> None:
        """A progress sample; a reporter may drop samples to limit its output, unless ``force``."""
        ...

    def event(self, name: str, data: dict[str, Any]) -> None: ...
    def stop(self) -> None: ...


class BarReporter:
    """A rich progress bar with bytes done, rate and ETA (for terminals)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        # Imported here: rich takes a while to import, and programs (--json) never see a bar.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._console = Console(file=stream or sys.stderr)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._task: TaskID | None = None

    def start(self, job_id: str, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(job_id, total=max(total, 1))

    def update(self, current: int, total: int, *, force: bool = False) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=current, total=max(total, 1))

    def event(self, name: str, data: dict[str, Any]) -> None:
        if name == "BLOCK_JOB_ERROR":
            self._console.print(f"[yellow]{data.get('operation')} error, action {data.get('action')}")

    def stop(self) -> None:
        self._progress.stop()


class JsonReporter:
    """JSON lines on a stream: progress samples (at most every ``interval`` s) and every job event."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self._out = stream or sys.stdout
        self._interval = interval
        self._job = ""
        self._last = 0.0
        self._t0 = 0.0
        self._current = -1

    def _emit(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj) + "\n")
        self._out.flush()

    def start(self, job_id: str, total: int) -> None:
        self._job = job_id
        self._t0 = time.monotonic()
        self._emit({"type": "start", "job": job_id, "total": total})

    def update(self, current: int, total: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if current == self._current or (not force and now - self._last < self._interval):
            return
        self._last = now
        self._current = current
        elapsed = now - self._t0
        rate = current / elapsed if elapsed > 0 else 0.0
        self._emit({"type": "progress", "job": self._job, "current": current, "total": total, "rate": rate})

    def event(self, name: str, data: dict[str, Any]) -> None:
        self._emit({"type": "event", "event": name, "data": data})

    def result(self, data: dict[str, Any]) -> None:
        """The last line: the outcome of the command (``bytes``, ``seconds``, ...)."""
        self._emit({"type": "result", **data})

    def stop(self) -> None:
        pass


class QuietReporter:
    """Nothing while running (output is not a terminal and --json was not asked)."""

    def start(self, job_id: str, total: int) -> None:
        pass

    def update(self, current: int, total: int, *, force: bool = False) -> None:
        pass

    def event(self, name: str, data: dict[str, Any]) -> None:
        pass

    def stop(self) -> None:
        pass


def make_reporter(json_lines: bool) -> Reporter:
    if json_lines:
        return JsonReporter()
    if sys.stderr.isatty():
        return BarReporter()
    return QuietReporter()
