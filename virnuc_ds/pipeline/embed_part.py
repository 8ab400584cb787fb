"""Embed one part: load the embedders, run DNABERT-S and ESM-2 with fault isolation and
out-of-memory recovery, write the part.

- A batch that raises is retried one frame at a time, so one bad record costs only itself: the
  frames that still fail are returned as FrameFailure(item, stage, message) and listed by the run in
  OUT/failed_files.txt; the rest of the part is kept.
- CUDA out-of-memory halves the embedder's token budget and retries the part (logged; the smaller
  budget is kept for later parts). Batching does not change results beyond the batching gates.
- Fault injection (tests, and users checking their setup): frame ids named in the config key
  `run.fail_frames` or the environment variable VIRNUC_DS_FAIL_FRAMES (comma-separated) raise
  inside the ESM-2 stage.
- Loading overlaps CPU work with the ESM-2 weight copies: DNABERT-S is built in a thread, and with
  VIRNUC_DS_PRELOAD_KERNELS=1 DeepSpeed is imported and its op loaded in another (off by default:
  on one H200 the weight copies slowed by as much as it hid, benchmarks/results/probe_h200_31c17cb).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..atomic import atomic_open
from ..errors import VirnucError, first_line, is_out_of_memory
from ..store.embeddings import finite_rows
from .parts import failures_path, finished_frames, part_path, read_part, write_part

log = logging.getLogger("virnuc_ds.run")

MIN_TOKS_PER_BATCH = 1024


@dataclass(frozen=True)
class FrameFailure:
    item: str
    stage: str
    message: str

    def line(self) -> str:
        return f"{self.item}|{self.stage}|{' '.join(self.message.split())}"


class InjectedFault(RuntimeError):
    pass


def injected_fault_ids(config_ids: Sequence[str]) -> frozenset[str]:
    env = os.environ.get("VIRNUC_DS_FAIL_FRAMES", "")
    return frozenset(config_ids) | frozenset(x.strip() for x in env.split(",") if x.strip())


def _is_broken_device(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory (an illegal address, a device-side assert, an ECC error):
    the process's CUDA context is unusable from then on, so every later frame would "fail" too."""
    if is_out_of_memory(exc):
        return False
    return isinstance(exc, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(exc)


class DeviceFailure(VirnucError):
    """The GPU failed in a way this process cannot recover from."""


def embed_with_oom_retry(embedder, sequences: list[str], stage: str) -> np.ndarray:
    """embedder.embed(sequences) [n, D]; on out-of-memory, halve the token budget and try again."""
    while True:
        try:
            return embedder.embed(sequences).numpy()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or embedder.toks_per_batch <= MIN_TOKS_PER_BATCH:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            embedder.toks_per_batch = max(MIN_TOKS_PER_BATCH, embedder.toks_per_batch // 2)
            log.warning("%s: out of GPU memory; retrying with %d tokens a batch", stage, embedder.toks_per_batch)


def embed_stage(embedder, stage: str, ids: list[str], sequences: list[str], fail_ids: frozenset[str], width: int):
    """(rows [n, width] float32, NaN rows for failed frames; failures)."""

    def run(sub_ids, sub_seqs):
        bad = [i for i in sub_ids if i in fail_ids]
        if bad:
            raise InjectedFault(f"injected fault (run.fail_frames / VIRNUC_DS_FAIL_FRAMES) for {bad[0]}")
        return embed_with_oom_retry(embedder, sub_seqs, stage)

    try:
        return run(ids, sequences), []
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing frames below
        if is_out_of_memory(batch_error):
            raise
        if _is_broken_device(batch_error):  # not the frames' fault: retrying them one by one would list them all
            raise DeviceFailure(f"{stage}: the GPU failed ({first_line(batch_error)}); this rank cannot use it again and stops. "
                                "Finished parts are kept: rerun the same command to resume") from batch_error
        log.warning("%s: a batch failed (%s); retrying its %d frames one at a time", stage, batch_error, len(ids))
    rows: list[np.ndarray | None] = []
    failures = []
    for rid, seq in zip(ids, sequences):
        try:
            rows.append(run([rid], [seq])[0])
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            if is_out_of_memory(exc):
                raise
            failures.append(FrameFailure(rid, stage, f"{type(exc).__name__}: {exc}"))
            rows.append(None)
    out = np.full((len(ids), width), np.nan, dtype=np.float32)
    for k, r in enumerate(rows):
        if r is not None:
            out[k] = r
    return out, failures


def _esm2_staging_device(esm2_path, device: torch.device) -> torch.device:
    """Where fair-esm's fp32 model is built before the embedder takes its weights: the GPU itself
    when it has room for five times the checkpoint file (fp32 model from an fp16 file, the compute
    copy, the kernel workspace): one host-to-device copy of the file and no CPU copy of the model.
    Else the CPU."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 5 * Path(esm2_path).stat().st_size < free else torch.device("cpu")


# While ESM-2's weights stream onto the GPU the main thread waits in copies with the GIL released,
# and the loader threads' CPU work fills those waits. After each copy the main thread needs the GIL
# back, and a busy thread yields it only when the interpreter's switch interval (5 ms by default)
# runs out: over ~500 weight tensors that cost seconds (scaling run 3: weights 1.5 -> 3.7 s beside
# a DeepSpeed import thread). During the load the interval is 0.5 ms.
LOAD_SWITCH_INTERVAL_S = 0.0005


@contextlib.contextmanager
def gil_switch_interval(seconds: float):
    """sys.setswitchinterval for the block, restored after it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def preload_kernels_enabled(environ=os.environ) -> bool:
    """VIRNUC_DS_PRELOAD_KERNELS=1: import DeepSpeed and load its op in a thread during the weight load."""
    return environ.get("VIRNUC_DS_PRELOAD_KERNELS", "0").strip().lower() in ("1", "true", "yes", "on")


def _load_kernel_op(device: torch.device) -> None:
    """Import DeepSpeed and load its transformer_inference op (1.5-1.9 s alone on an H200 node,
    benchmarks/results/probe_h200_31c17cb). A failure is left for the kernel encoder's build, which
    repeats the load and reports it."""
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread: never GPU 0 by default
        from ..embed.esm2_kernels import prebuild_inference_op

        prebuild_inference_op()
    except Exception:  # noqa: BLE001 - reported by the main thread's own attempt
        pass


def load_embedders(cfg, esm2_path, dnabert_path, device, esm_dtype, dna_dtype, kernel_inject, steps=None):
    """(ESM-2 embedder, DNABERT-S embedder, ESM-2 width, DNABERT-S width) on this rank's device.
    steps, a dict, receives the seconds of each step (for the run report)."""
    from ..embed.dnabert_s import DnabertSEmbedder
    from ..models.dnabert_s import load_dnabert_s

    steps = {} if steps is None else steps
    preload = kernel_inject and preload_kernels_enabled()
    # DNABERT-S is read and built on the CPU in a thread while ESM-2 loads onto the GPU
    with gil_switch_interval(LOAD_SWITCH_INTERVAL_S), \
            concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="model-load") as pool:
        dnabert_job = pool.submit(load_dnabert_s, dnabert_path)
        kernels_job = pool.submit(_load_kernel_op, device) if preload else None
        esm, esm_width = _load_esm2_embedder(cfg, esm2_path, device, esm_dtype, kernel_inject, steps, kernels_job)
        t0 = time.time()
        dmodel, tokenizer = dnabert_job.result()
        steps["load_dnabert_s_wait"] = time.time() - t0
    t0 = time.time()
    dna = DnabertSEmbedder(dmodel, tokenizer, device=device, dtype=dna_dtype, toks_per_batch=cfg.dnabert_s.toks_per_batch)
    steps["load_dnabert_s_to_device"] = time.time() - t0
    return esm, dna, esm_width, dmodel.config.hidden_size


def _load_esm2_embedder(cfg, esm2_path, device, esm_dtype, kernel_inject, steps, kernels_job=None):
    from ..embed.esm2 import Esm2Embedder
    from ..models.esm2 import load_esm2

    t0 = time.time()
    staging = _esm2_staging_device(esm2_path, device)
    t1 = time.time()
    model, alphabet = load_esm2(esm2_path, staging)
    t2 = time.time()
    steps.update(load_esm2_staging=t1 - t0, load_esm2_weights=t2 - t1)
    log.info("ESM-2 weights loaded onto %s in %.1f s", staging, t2 - t1)
    if kernels_job is not None:
        kernels_job.result()
        steps["load_kernels_wait"] = time.time() - t2
        t2 = time.time()
    elif kernel_inject:  # DeepSpeed's import and op load, timed apart from the kernel encoder's build
        _load_kernel_op(device)
        steps["load_kernels"] = time.time() - t2
        t2 = time.time()
    settings = dict(device=device, dtype=esm_dtype, toks_per_batch=cfg.esm2.toks_per_batch, max_residues=cfg.esm2.max_residues)
    try:
        esm = Esm2Embedder(model, alphabet, kernel_inject=kernel_inject, attention=cfg.esm2.attention, **settings)
    except VirnucError as exc:
        if not (kernel_inject and cfg.esm2.fallback_to_eager):
            raise
        log.warning("DeepSpeed kernels unavailable (%s); esm2.fallback_to_eager is set: running fair-esm eager", exc)
        model, alphabet = load_esm2(esm2_path)  # the failed injection may have altered the weights
        esm = Esm2Embedder(model, alphabet, kernel_inject=False, **settings)
        # the run report names such ranks: their parts carry the run's (kernels') fingerprint
        steps["esm2_fallback_to_eager"] = True
    t3 = time.time()
    esm_width = model.embed_dim
    del model  # the embedder holds its own copy of the weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    steps.update(load_esm2_embedder=t3 - t2, load_esm2_release=time.time() - t3)  # embedder: the build after the op
    return esm, esm_width


def embed_part(out: Path, part, frames, embedders, fingerprint: str, fail_ids, device, finisher=None) -> dict:
    """Compute the part's missing frames (all of them, or those that failed last time), write it."""
    esm_embedder, dna_embedder, esm_width, dna_width = embedders
    path = part_path(out, part.index)
    have = finished_frames(path, fingerprint)
    kept = read_part(path) if have is not None and len(have) else None
    need = part.frames if kept is None else part.frames[~np.isin(part.frames, kept["frame_index"])]
    ids = [frames.ids[i] for i in need]
    t0 = time.time()
    # injected faults (run.fail_frames) strike the ESM-2 stage only
    dna, dna_failed = embed_stage(dna_embedder, "dnabert_s", ids, [frames.nucleotides[i] for i in need], frozenset(), dna_width)
    sync(device)
    t1 = time.time()
    proteins = [frames.proteins[i] for i in need]
    esm, esm_failed = embed_stage(esm_embedder, "esm2", ids, proteins, fail_ids, esm_width)
    sync(device)
    t2 = time.time()
    failures = dna_failed + esm_failed
    ok = finite_rows(dna, esm)
    failures += non_finite_failures(ids, dna, esm, ok, {f.item for f in failures})
    if kept is None and ok.all():  # the usual case: every frame of the part, already in its order
        write_part(path, part.index, need, ids, dna, esm, fingerprint, finisher)
    else:
        rows_index, rows_ids, rows_dna, rows_esm = need[ok], [i for i, good in zip(ids, ok) if good], dna[ok], esm[ok]
        if kept is not None:
            rows_index = np.concatenate([kept["frame_index"], rows_index])
            rows_ids = kept["ids"] + rows_ids
            rows_dna = np.concatenate([kept["dnabert_s"], rows_dna])
            rows_esm = np.concatenate([kept["esm2"], rows_esm])
        position = {int(f): k for k, f in enumerate(part.frames)}
        order = np.argsort([position[int(f)] for f in rows_index], kind="stable")  # the part's own order
        write_part(path, part.index, rows_index[order], [rows_ids[k] for k in order], rows_dna[order], rows_esm[order],
                   fingerprint, finisher)
    failed_file = failures_path(out, part.index)
    if failures:
        with atomic_open(failed_file) as fh:
            fh.write("".join(f.line() + "\n" for f in failures))
    else:
        failed_file.unlink(missing_ok=True)
    tokens = sum(esm_embedder.token_count(p) for p in proteins)
    return {"dnabert_s": t1 - t0, "esm2": t2 - t1, "part_write": time.time() - t2, "esm2_tokens": tokens,
            "failed_frames": len({f.item for f in failures})}


def non_finite_failures(ids: list[str], dna: np.ndarray, esm: np.ndarray, ok: np.ndarray, failed: set) -> list:
    """Frames whose embedding came back with NaN or Inf (e.g. an fp16 overflow) without an error: listed
    as failed like any other, so the run completes and names them instead of missing them silently."""
    out = []
    for k in np.flatnonzero(~ok):
        if ids[k] in failed:
            continue
        stages = [name for name, rows in (("dnabert_s", dna), ("esm2", esm)) if not np.isfinite(rows[k]).all()]
        for stage in stages:
            out.append(FrameFailure(ids[k], stage, "the embedding has NaN or Inf values (a dtype overflow? "
                                    "try esm2.dtype / dnabert_s.dtype: bf16 or fp32)"))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
