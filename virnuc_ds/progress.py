"""Progress of a run: each rank's status in OUT/progress/rank{r}.json, and rank 0's view of all ranks.

Every rank rewrites its status file (atomically) when it finishes a part: frames and parts done,
tokens/s (ESM-2 tokens per second of part time, both models and the write included: the rate the
ETA follows), ETA, peak GPU memory. Rank 0 also shows every rank's status:
- on a terminal (stderr is a TTY): a live `rich` table, redrawn every second;
- otherwise (SLURM and PBS logs): one plain log line every `interval` seconds (default 30).
Set VIRNUC_DS_PROGRESS=plain for log lines on a terminal too, or =off for no view at all.

The view is drawn by one daemon thread on rank 0 that `close()` stops and joins with a timeout, so
it never keeps a process from exiting. Status files from other ranks are read as they are: on a
shared file system they may lag by a refresh; a missing or half-visible file is shown as waiting.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_open

log = logging.getLogger("virnuc_ds.progress")

PROGRESS_DIR = "progress"
LIVE_REFRESH_SECONDS = 1.0


@dataclass
class RankStatus:
    rank: int
    world_size: int
    host: str
    frames_total: int
    parts_total: int
    frames_done: int = 0
    parts_done: int = 0
    tokens: int = 0
    compute_seconds: float = 0.0
    tokens_per_s: float = 0.0
    eta_seconds: float | None = None
    gpu_max_memory_bytes: int | None = None
    state: str = "running"  # running | done | stopped (by a signal or an error: a rerun resumes)
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


def status_path(output_dir: str | os.PathLike, rank: int) -> Path:
    return Path(output_dir) / PROGRESS_DIR / f"rank{rank}.json"


def read_statuses(output_dir: str | os.PathLike, world_size: int) -> list[dict | None]:
    """Each rank's last status, or None where there is none (yet)."""
    out: list[dict | None] = []
    for r in range(world_size):
        try:
            out.append(json.loads(status_path(output_dir, r).read_text()))
        except (OSError, ValueError):
            out.append(None)
    return out


def _gpu_max_memory() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def format_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def summary_line(statuses: list[dict | None]) -> str:
    """One line for a log: frames done of all ranks, total tokens/s, ETA of the slowest rank."""
    seen = [s for s in statuses if s]
    done = sum(s["frames_done"] for s in seen)
    total = sum(s["frames_total"] for s in seen)
    rate = sum(s["tokens_per_s"] for s in seen)  # each rank's average over its parts, added up
    etas = [s["eta_seconds"] for s in seen if s["state"] == "running" and s["eta_seconds"] is not None]
    finished = sum(1 for s in seen if s["state"] != "running")
    pct = 100.0 * done / total if total else 100.0
    mem = [s["gpu_max_memory_bytes"] for s in seen if s.get("gpu_max_memory_bytes")]
    line = (f"progress: {done:,}/{total:,} frames ({pct:.1f}%), {rate:,.0f} tokens/s, "
            f"ETA {format_duration(max(etas) if etas else (0 if finished == len(statuses) else None))}, "
            f"ranks finished {finished}/{len(statuses)}")
    if len(seen) < len(statuses):
        line += f", {len(statuses) - len(seen)} rank(s) not reporting yet"
    if mem:
        line += f", GPU memory peak {format_bytes(max(mem))}"
    return line


def rich_table(statuses: list[dict | None]):
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="virnuc-ds", caption=summary_line(statuses), caption_justify="left")
    for name, justify in (("rank", "right"), ("host", "left"), ("frames done", "right"), ("parts", "right"),
                          ("tokens/s", "right"), ("ETA", "right"), ("GPU mem peak", "right"), ("state", "left")):
        table.add_column(name, justify=justify)
    for r, s in enumerate(statuses):
        if s is None:
            table.add_row(str(r), "-", "-", "-", "-", "-", "-", "waiting")
            continue
        pct = 100.0 * s["frames_done"] / s["frames_total"] if s["frames_total"] else 100.0
        table.add_row(
            str(r), s["host"], f"{s['frames_done']:,}/{s['frames_total']:,} ({pct:.0f}%)",
            f"{s['parts_done']}/{s['parts_total']}", f"{s['tokens_per_s']:,.0f}",
            format_duration(s["eta_seconds"]), format_bytes(s.get("gpu_max_memory_bytes")), s["state"],
        )
    return table


class ProgressReporter:
    """Writes this rank's status after each part; on rank 0 also shows all ranks (see module doc).

        progress = ProgressReporter(out, ctx.rank, ctx.world_size, total_frames, total_parts)
        ... progress.part_done(frames, tokens, seconds) after each part ...
        progress.close()

    `total_frames` and `total_parts` are this rank's work in this run (its parts still to compute).
    """

    def __init__(self, output_dir, rank: int, world_size: int, total_frames: int, total_parts: int,
                 *, interval: float = 30.0, mode: str | None = None, stream=None):
        self.output_dir = Path(output_dir)
        self.status = RankStatus(rank, world_size, socket.gethostname(), int(total_frames), int(total_parts))
        self.interval = interval
        self._stream = stream if stream is not None else sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live = None
        self._closed = False
        self._write()
        if rank == 0:
            self.mode = mode or self._choose_mode()
            if self.mode != "off":
                self._start_view()
        else:
            self.mode = "off"

    # -- this rank ------------------------------------------------------------------------------

    def part_done(self, frames: int, tokens: int, seconds: float) -> None:
        s = self.status
        s.frames_done += int(frames)
        s.parts_done += 1
        s.tokens += int(tokens)
        s.compute_seconds += float(seconds)
        s.tokens_per_s = s.tokens / s.compute_seconds if s.compute_seconds > 0 else 0.0
        frames_per_s = s.frames_done / s.compute_seconds if s.compute_seconds > 0 else 0.0
        remaining = max(0, s.frames_total - s.frames_done)
        s.eta_seconds = remaining / frames_per_s if frames_per_s > 0 else None
        s.gpu_max_memory_bytes = _gpu_max_memory()
        self._write()

    def close(self) -> None:
        """Mark this rank done (or stopped, if its parts are not all done); on rank 0 stop the view after
        drawing it a last time. Safe to call twice (e.g. once after the barrier, once in a finally)."""
        if self._closed:
            return
        self._closed = True
        finished = self.status.frames_done >= self.status.frames_total
        self.status.state = "done" if finished else "stopped"
        if finished:
            self.status.eta_seconds = 0.0
        self.status.gpu_max_memory_bytes = _gpu_max_memory()
        self._write()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self.mode == "live":
            self._stop_live()
        elif self.mode == "plain":
            log.info(summary_line(read_statuses(self.output_dir, self.status.world_size)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _write(self) -> None:
        self.status.updated = time.time()
        path = status_path(self.output_dir, self.status.rank)
        try:
            # not fsync'd: written after every part on the GPU's path, and a lost update costs nothing
            with atomic_open(path, durable=False) as fh:
                json.dump(asdict(self.status), fh)
        except OSError as exc:  # progress is never worth failing a run
            log.debug("could not write %s: %s", path, exc)

    # -- rank 0's view --------------------------------------------------------------------------

    def _choose_mode(self) -> str:
        wanted = os.environ.get("VIRNUC_DS_PROGRESS", "").strip().lower()
        if wanted in ("off", "plain", "live"):
            return wanted
        isatty = getattr(self._stream, "isatty", None)
        return "live" if isatty is not None and isatty() else "plain"

    def _statuses(self) -> list[dict | None]:
        return read_statuses(self.output_dir, self.status.world_size)

    def _start_view(self) -> None:
        if self.mode == "live":
            from rich.console import Console  # noqa: PLC0415
            from rich.live import Live  # noqa: PLC0415

            self._live = Live(rich_table(self._statuses()), console=Console(file=self._stream),
                              auto_refresh=False, transient=False, redirect_stdout=False, redirect_stderr=False)
            self._live.start(refresh=True)
            self._route_logging_through(self._live.console)
            period = LIVE_REFRESH_SECONDS
        else:
            period = self.interval
        self._thread = threading.Thread(target=self._view_loop, args=(period,), name="virnuc-ds-progress", daemon=True)
        self._thread.start()

    def _view_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                statuses = self._statuses()
                if self.mode == "live":
                    self._live.update(rich_table(statuses), refresh=True)
                else:
                    log.info(summary_line(statuses))
            except Exception as exc:  # noqa: BLE001 - a view error must never stop the run
                log.debug("progress view: %s", exc)

    def _route_logging_through(self, console) -> None:
        """Log lines of this process print above the live table instead of tearing it."""
        self._rerouted = []
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is self._stream:
                self._rerouted.append(handler)
                handler.setStream(_ConsoleWriter(console))

    def _stop_live(self) -> None:
        try:
            self._live.update(rich_table(self._statuses()), refresh=True)
        finally:
            self._live.stop()
            for handler in getattr(self, "_rerouted", []):
                handler.setStream(self._stream)


class _ConsoleWriter:
    """A file-like object that prints through a rich Console (so a Live display stays intact)."""

    def __init__(self, console):
        self.console = console

    def write(self, text: str) -> int:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass
