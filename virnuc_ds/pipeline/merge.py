"""Merge the part files into OUT/embeddings.h5 in frame order, classify, and check completeness.

`MergeWriter` takes finished parts one at a time: it scatters their rows into a pre-allocated
embeddings file (contiguous HDF5 datasets written through a memory map: the rows of a
length-sorted part land all over the frame order), checks them (ids match the prepared frames,
values finite) and, with a classifier, classifies them and formats their result lines. `finish()`
checks completeness (every prepared frame has exactly one row, or is listed as failed), renames the
file into place and writes the two result files. Memory stays at a part's size whatever the run's.

During a run, rank 0 starts `BackgroundMerge`: the same writer in a separate process that picks
parts up as the ranks finish them, so merging and classifying overlap the GPU work and the run ends
a few parts after the last GPU batch. Anything else raises IncompleteError (exit code 2) naming what
is missing or wrong; nothing is left under a result's name unless complete.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from pathlib import Path

import h5py
import numpy as np

from ..atomic import durable_rename, temporary_path
from ..errors import EXIT_FAILURE, IncompleteError, VirnucError, exit_on_sigterm, ignore_interrupts
from ..store.embeddings import EMBEDDING_DATASETS, FORMAT, FORMAT_VERSION, ROWS_PER_CHUNK, UTF8_STRING, finite_rows
from ..version import __version__
from .parts import PARTS_DIR, all_failure_lines, failed_ids_of, read_part

log = logging.getLogger("virnuc_ds.run")

EMBEDDINGS_H5 = "embeddings.h5"
POLL_SECONDS = 0.5
SETTLE_POLL_SECONDS = 5.0
# how long rank 0 looks again for parts written on other nodes (a run of several nodes): NFS clients
# revalidate a folder's cached listing after at most acdirmax, 60 s by default
PART_VISIBILITY_SECONDS = 90.0


def _examples(items, total: int | None = None, n: int = 5) -> str:
    """The first n items, and how many more of `total` (default: all items given) there are."""
    items = list(items)
    total = len(items) if total is None else total
    more = f" and {total - n} more" if total > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


class MergeWriter:
    """Scatter parts into a full-size embeddings file, classify their rows, then finish it."""

    def __init__(self, output_dir, frame_ids: list[str], fingerprint: str | None, attrs: dict | None = None,
                 classifier_path: str | None = None, classify_device: str = "auto"):
        self.out = Path(output_dir)
        self.frame_ids = frame_ids
        self.fingerprint = fingerprint
        self.attrs = dict(attrs or {})
        n = len(frame_ids)
        if n == 0:
            raise IncompleteError(f"{self.out}: the prepared frame list is empty (no open reading frame in the input); nothing to merge")
        self.filled = np.zeros(n, dtype=np.int64)  # rows each frame received
        self.added: dict[Path, tuple[tuple, np.ndarray]] = {}  # part -> (stat key, its frame indices)
        self.widths: dict[str, int] | None = None
        self.maps: dict[str, np.memmap] = {}
        self.tmp: Path | None = None
        self.classifier = None
        self.classifier_path = classifier_path
        self.classify_device = classify_device
        self.probabilities = np.full((n, 2), np.nan, dtype=np.float32) if classifier_path else None
        self.lines: list[str | None] = [None] * n if classifier_path else []
        self.groups = None  # SequenceGroups, built with the first classified part
        self.busy = {"merge": 0.0, "classify": 0.0}

    # -- the embeddings file ---------------------------------------------------------------
    def _create(self, widths: dict[str, int]) -> None:
        """Full-size contiguous datasets, allocated now and never filled, mapped into memory; the
        frame ids are written now too (a few seconds for a million frames, off the run's end)."""
        self.tmp = temporary_path(self.out / EMBEDDINGS_H5)
        n = len(self.frame_ids)
        offsets = {}
        with h5py.File(self.tmp, "w") as f:
            f.create_dataset("ids", data=np.array(self.frame_ids, dtype=object), dtype=UTF8_STRING)
            for name in EMBEDDING_DATASETS:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_layout(h5py.h5d.CONTIGUOUS)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                space = h5py.h5s.create_simple((n, widths[name]))
                dset = h5py.h5d.create(f.id, name.encode(), h5py.h5t.IEEE_F32LE, space, dcpl=dcpl)
                offsets[name] = dset.get_offset()
        self.widths = widths
        self.maps = {name: np.memmap(self.tmp, dtype="<f4", mode="r+", offset=offsets[name], shape=(n, widths[name]))
                     for name in EMBEDDING_DATASETS}

    def discard(self) -> None:
        self.maps = {}
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    # -- parts -----------------------------------------------------------------------------
    def add_new_parts(self) -> int:
        """Add every part file not added yet (or rewritten since); returns how many were added."""
        added = 0
        for path in sorted((self.out / PARTS_DIR).glob("part-*.h5")):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            earlier = self.added.get(path)
            if earlier is not None and earlier[0] == key:
                continue
            if self.add_part(path, key):
                added += 1
        return added

    def add_part(self, path: Path, key: tuple = ()) -> bool:
        t0 = time.time()
        part = read_part(path)
        if self.fingerprint is not None and part["fingerprint"] != self.fingerprint:
            return False  # a part of another run's layout; it is not ours to merge
        n = len(self.frame_ids)
        idx = part["frame_index"]
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IncompleteError(f"{path}: frame indices outside the {n} prepared frames")
        wrong = [(i, a) for i, a in zip(idx, part["ids"]) if self.frame_ids[i] != a]
        if wrong:
            raise IncompleteError(f"{path}: ids do not match the prepared frames, e.g. {wrong[0][1]!r}")
        finite = finite_rows(part["dnabert_s"], part["esm2"])
        if not finite.all():
            bad = [part["ids"][k] for k in np.flatnonzero(~finite)]
            raise IncompleteError(f"{len(bad)} frames have NaN or Inf embeddings ({_examples(bad)}) in {path}")
        if self.widths is None:
            self._create({name: part[name].shape[1] for name in EMBEDDING_DATASETS})
        earlier = self.added.pop(path, None)
        if earlier is not None:  # rewritten (a rerun retried its failed frames): replace its rows
            np.subtract.at(self.filled, earlier[1], 1)
        for name in EMBEDDING_DATASETS:
            self.maps[name][idx] = part[name]
            self.maps[name].flush()  # written back part by part: finish() has only the last to sync
        np.add.at(self.filled, idx, 1)
        self.added[path] = (key, idx)
        t1 = time.time()
        self.busy["merge"] += t1 - t0
        if self.classifier_path and len(idx):
            self._classify(idx, part)
            self.busy["classify"] += time.time() - t1
        return True

    def _classify(self, idx: np.ndarray, part: dict) -> None:
        from ..classify import pick_device
        from ..classify.mlp import load_classifier
        from ..classify.predict import prediction_line, predict_probabilities

        features = np.concatenate([part["dnabert_s"], part["esm2"]], axis=1)  # [n, H_dna + H_esm]
        if self.classifier is None:
            from ..classify.predict import SequenceGroups

            self.classify_device = pick_device(self.classify_device)
            self.classifier = load_classifier(self.classifier_path, expected_input_dim=features.shape[1])
            self.groups = SequenceGroups(self.frame_ids)  # ~0.9 s for 626k frames (benchmarks/run_end_cpu.py): off the run's end
        probs = predict_probabilities(self.classifier, features, device=self.classify_device)  # [n, 2]
        self.probabilities[idx] = probs
        for k, i in enumerate(idx):
            self.lines[i] = prediction_line(self.frame_ids[i], probs[k])

    # -- the end ---------------------------------------------------------------------------
    def missing_frames(self, failed_ids: frozenset[str] = frozenset()) -> np.ndarray:
        """Indices of the frames no part holds, less those listed as failed."""
        n = len(self.frame_ids)
        listed_failed = np.array([i in failed_ids for i in self.frame_ids], dtype=bool) if failed_ids else np.zeros(n, dtype=bool)
        return np.flatnonzero((self.filled == 0) & ~listed_failed)

    def add_last_parts(self, failed_ids: frozenset[str] = frozenset(), settle_seconds: float = 0.0) -> frozenset[str]:
        """The last scan, once every rank is done; returns the failed frames' ids. On a network file
        system (NFS caches a folder's listing for up to a minute), a part or failure list another node
        renamed into place moments ago may not be listed here yet: with settle_seconds, look again
        every few seconds while frames are missing."""
        self.add_new_parts()
        deadline = time.monotonic() + settle_seconds
        while (missing := len(self.missing_frames(failed_ids))) and time.monotonic() < deadline:
            log.info("%d frames not in the parts listed yet: looking again (parts written on other nodes "
                     "may take a while to show on a network file system)", missing)
            time.sleep(SETTLE_POLL_SECONDS)
            self.add_new_parts()
            failed_ids = failed_ids | failed_ids_of(all_failure_lines(self.out))
        return failed_ids

    def finish(self, failed_ids: frozenset[str] = frozenset()) -> dict:
        """Check completeness, put embeddings.h5 (and the result files) in place; returns stats."""
        t0 = time.time()
        n = len(self.frame_ids)
        missing = self.missing_frames(failed_ids)
        if len(missing):
            raise IncompleteError(
                f"{len(missing)} of {n} frames have no embeddings "
                f"({_examples((self.frame_ids[i] for i in missing[:5]), len(missing)) if self.added else 'no part files'}); "
                "rerun the same command to compute them"
            )
        duplicated = np.flatnonzero(self.filled > 1)
        if len(duplicated):
            raise IncompleteError(f"{len(duplicated)} frames appear in several parts ({_examples((self.frame_ids[i] for i in duplicated[:5]), len(duplicated))})")
        keep = self.filled > 0
        if not keep.any():
            raise IncompleteError(f"all {n} frames failed; see {self.out / 'failed_files.txt'}")
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "virnuc_ds_version": __version__, **self.attrs}
        for mm in self.maps.values():
            mm.flush()
        self.maps = {}
        final = self.out / EMBEDDINGS_H5
        if keep.all():
            with h5py.File(self.tmp, "r+") as f:
                for k, v in attrs.items():
                    f.attrs[k] = "" if v is None else v
            source = self.tmp
        else:  # frames failed: write only the kept rows
            source = self._compact(keep, attrs)
        durable_rename(source, final)
        self.tmp = None
        result = {"frames": int(keep.sum()), "parts": len(self.added), "merge_busy_seconds": self.busy["merge"],
                  "classify_busy_seconds": self.busy["classify"]}
        if self.classifier_path:
            from ..classify.predict import HIGHEST_CSV, RESULTS_TXT, SequenceGroups, write_highest_score_table, write_prediction_lines

            write_prediction_lines(self.out / RESULTS_TXT, [line for line, k in zip(self.lines, keep) if k])
            groups = self.groups if self.groups is not None else SequenceGroups(self.frame_ids)
            write_highest_score_table(self.out / HIGHEST_CSV, groups.table(self.probabilities, keep))
        result["finish_seconds"] = time.time() - t0
        return result

    def _compact(self, keep: np.ndarray, attrs: dict) -> Path:
        dest = temporary_path(self.out / EMBEDDINGS_H5)
        n_keep = int(keep.sum())
        with h5py.File(self.tmp, "r") as src, h5py.File(dest, "w") as f:
            f.create_dataset("ids", data=np.array([i for i, k in zip(self.frame_ids, keep) if k], dtype=object), dtype=UTF8_STRING)
            for name in EMBEDDING_DATASETS:
                width = src[name].shape[1]
                dset = f.create_dataset(name, shape=(n_keep, width), dtype="float32",
                                        chunks=(max(1, min(n_keep, ROWS_PER_CHUNK)), width))
                at = 0
                for start in range(0, len(keep), 8192):  # one sequential pass over the full file
                    block_keep = keep[start:start + 8192]
                    rows = src[name][start:start + len(block_keep)][block_keep]
                    dset[at:at + len(rows)] = rows
                    at += len(rows)
            for k, v in attrs.items():
                f.attrs[k] = "" if v is None else v
        self.tmp.unlink(missing_ok=True)
        return dest


def merge_parts(output_dir, frame_ids, attrs=None, fingerprint=None, failed_ids=frozenset(),
                classifier_path=None, classify_device="auto", settle_seconds: float = 0.0) -> dict:
    """Merge (and classify) every part now, in this process: `virnuc-ds merge`, and the fallback."""
    writer = MergeWriter(output_dir, frame_ids, fingerprint, attrs, classifier_path, classify_device)
    try:
        return writer.finish(writer.add_last_parts(failed_ids, settle_seconds))
    finally:
        writer.discard()


def _merge_process(output_dir, prep_dir, fingerprint, attrs, classifier_path, classify_device, threads, conn):
    """Body of the background merge: add parts as they land until rank 0 sends the failed frame
    ids (every rank is done), then a last scan, finish, and the result back."""
    ignore_interrupts()  # rank 0 decides what a Ctrl-C means, and tells this process
    exit_on_sigterm()  # abandon(): the temporary embeddings file is removed on the way out
    writer = None
    try:
        import torch

        torch.set_num_threads(threads)
        from .frames_table import read_frame_ids

        writer = MergeWriter(output_dir, read_frame_ids(prep_dir), fingerprint, attrs, classifier_path, classify_device)
        parent = mp.parent_process()
        while not conn.poll(POLL_SECONDS):
            writer.add_new_parts()
            if parent is not None and not parent.is_alive():
                return  # rank 0 is gone: nothing to finish
        failed_ids, settle_seconds = conn.recv()
        failed_ids = writer.add_last_parts(failed_ids, settle_seconds)  # the parts written before rank 0 said stop
        conn.send(("ok", writer.finish(failed_ids)))
    except BaseException as exc:  # noqa: BLE001 - handed to rank 0, which reports it
        try:
            conn.send(("error", getattr(exc, "exit_code", EXIT_FAILURE), f"{exc}", type(exc).__name__))
        except OSError:  # rank 0 is gone or stopped listening (abandon)
            pass
    finally:
        if writer is not None:
            writer.discard()
        conn.close()


class BackgroundMerge:
    """Rank 0's merge process: merges and classifies parts while the GPUs still compute."""

    def __init__(self, output_dir, prep_dir, fingerprint, attrs, classifier_path, classify_device, threads: int = 2):
        ctx = mp.get_context("spawn")  # never fork a process holding CUDA and torch threads
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_merge_process, name="virnuc-ds-merge", daemon=True,
            args=(str(output_dir), str(prep_dir), fingerprint, attrs, classifier_path, classify_device, threads, child_conn),
        )
        self.process.start()
        child_conn.close()

    def finish(self, failed_ids: frozenset[str] = frozenset(), settle_seconds: float = 0.0) -> dict | None:
        """Stop after the parts now on disk and return the merge's result; raises its error.
        None if the process died without a word (the caller merges in-process instead).
        settle_seconds: see MergeWriter.add_last_parts."""
        try:
            self.conn.send((failed_ids, settle_seconds))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it has ended already: its error may still be waiting in the pipe
        try:
            message = self.conn.recv()
        except (EOFError, ConnectionResetError):
            message = None
        self.process.join()
        if message is None:
            log.warning("the background merge ended without a result (exit code %s); merging in this process",
                        self.process.exitcode)
            return None
        if message[0] == "ok":
            return message[1]
        _, code, text, kind = message
        exc = IncompleteError(text) if kind == "IncompleteError" else VirnucError(f"merging the parts failed: {kind}: {text}")
        exc.exit_code = code
        raise exc

    def abandon(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
