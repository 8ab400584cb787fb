"""Stage 1 of a run, on rank 0: chunk the input and translate its frames into OUT/prep, in a
process of its own while every rank loads its models.

A process, not a thread: prepare's main loop (reading the input, handing blocks to its worker
pool, writing the results in input order) holds the GIL most of the time, and on rank 0 it
slowed the model load beside it by seconds (scaling run 3: ESM-2 weights onto the GPU in 7.3 s
on rank 0 against ~1.5 s alone). This module imports nothing heavy, so the spawned process is
ready in a fraction of a second.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..errors import InputError, VirnucError, ignore_interrupts
from ..prep.prepare import prepare
from ..run import PREP_DIR
from .fingerprint import MANIFEST

log = logging.getLogger("virnuc_ds.run")
PROGRESS_EVERY_SECONDS = 30.0


def prepare_inputs(cfg, input_path: Path, out: Path, check: dict) -> dict:
    """Chunk and translate the input into OUT/prep (nothing is left there on bad input), logging
    how far it got every PROGRESS_EVERY_SECONDS on a large input. Returns {"fingerprint",
    "seconds", "stats"}."""
    t0 = time.time()
    prep = out / PREP_DIR
    last = [t0]

    def progress(stats) -> None:
        now = time.time()
        if now - last[0] >= PROGRESS_EVERY_SECONDS:
            last[0] = now
            log.info("prepare: %d records, %d frames so far (%.0f s)", stats.records, stats.frames, now - t0)

    try:
        stats = prepare(input_path, cfg.prepare.expected_length, prep, workers=cfg.prepare.workers, progress=progress)
        if stats.frames == 0:
            shutil.rmtree(prep, ignore_errors=True)
            raise InputError(input_path, f"no open reading frame: no {cfg.prepare.expected_length}-bp chunk has a "
                             "frame of at least one codon without a stop codon, so there is nothing to embed")
    except BaseException:
        # bad input leaves no partial output: without this, the corrected input is refused
        # as "another input_sha256" on the rerun
        if check["new_manifest"]:
            (out / MANIFEST).unlink(missing_ok=True)
        raise
    return {"fingerprint": check["fingerprint"], "seconds": time.time() - t0, "stats": stats.__dict__}


# Niceness of the prepare process and its worker pool. The ranks' model loads beside it (DeepSpeed's
# import, the kernel build) are on the run's critical path and prepare mostly is not. In scaling
# run 4 the 4 ranks' DeepSpeed embedder step took 5.2-6.1 s beside a 7 s prepare on all 64 cores
# of the node (reads150), against 4.4 s beside a 3 s one (contigs500). Niced, prepare still takes
# every core the ranks leave idle.
PREPARE_NICENESS = 10


def _exit_when_orphaned(rank_pid: int, every_seconds: float = 1.0) -> None:
    """The rank is gone (killed, e.g. with SIGKILL): stop now, so nothing of this prepare is renamed
    into OUT/prep later, under a run started since. The pool's workers exit with their pipe."""
    while True:
        time.sleep(every_seconds)
        if os.getppid() != rank_pid:
            os._exit(1)


def _prepare_in_child(cfg, input_path: Path, out: Path, check: dict, verbose: bool, rank_pid: int) -> dict:
    from ..cli import configure_logging

    threading.Thread(target=_exit_when_orphaned, args=(rank_pid,), name="orphan-watch", daemon=True).start()
    configure_logging(verbose)  # the same "HH:MM:SS rankR LEVEL: ..." lines as the rank
    try:
        os.nice(PREPARE_NICENESS)  # the worker pool, spawned from here, inherits it
    except OSError:  # pragma: no cover - not permitted here: run at the rank's priority
        pass
    signal_name = os.environ.get("VIRNUC_DS_TEST_SIGNAL_GROUP_IN_PREPARE")  # the Ctrl-C test; never set in use
    if signal_name:
        os.killpg(os.getpgrp(), getattr(signal, f"SIG{signal_name}"))
    info = prepare_inputs(cfg, input_path, out, check)
    info["niceness"] = os.nice(0)
    return info


class PrepareProcessLost(VirnucError):
    """prepare's process died without a result (killed by a signal or for lack of memory)."""


class PrepareInBackground:
    """prepare_inputs in a spawned process; result() waits for it and returns its dict or raises
    its error (InputError and the other errors of prepare pickle across)."""

    def __init__(self, cfg, input_path: Path, out: Path, check: dict, verbose: bool = False):
        self._pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=ignore_interrupts)
        self._future = self._pool.submit(_prepare_in_child, cfg, Path(input_path), Path(out), check, verbose, os.getpid())

    def result(self) -> dict:
        try:
            return self._future.result()
        except KeyboardInterrupt:  # told to stop at once while waiting (prepare itself ignores Ctrl-C)
            self.abandon()
            raise
        except BrokenProcessPool:
            raise PrepareProcessLost("prepare's process ended abruptly (killed, e.g. by the system for lack of memory); "
                                     "nothing of it is kept: rerun the same command") from None
        finally:
            self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop prepare now (the rank was told to stop at once): result() then raises PrepareProcessLost.
        Its outputs are written atomically, so a rerun starts prepare afresh."""
        for process in list((getattr(self._pool, "_processes", None) or {}).values()):  # the executor's own table
            if process.is_alive():
                process.terminate()
