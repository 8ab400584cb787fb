"""The rank runner: one process per GPU under the DeepSpeed launcher, or a single process.

    deepspeed --num_gpus 4 --module virnuc_ds.run --config C --input X.fa --expected-length 500 --output-dir OUT
    python -m virnuc_ds.run ...            (one rank, no launcher)
    virnuc-ds run ...                      (the same, from the console script)

Stages (each a function of its own module):
  prepare (rank 0, all CPU cores)  -> OUT/prep/{chunked.fa, identified_nucleotide.fa, identified_protein.faa}
  plan parts + assign to ranks     -> pipeline/shard.py (length-sorted, token-balanced, any world size)
  embed my parts                   -> OUT/parts/part-NNNNNN.h5 (atomic, one per finished part)
  merge + completeness (rank 0)    -> OUT/embeddings.h5
  classify (rank 0)                -> OUT/prediction_results.txt, OUT/prediction_results_highestscore.csv
Rerunning the same command resumes: finished parts are skipped. `--force` starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_open, ensure_writable_dir, remove_stale_temporaries
from .config import Config, load_config
from .errors import EXIT_FAILURE, ConfigError, IncompleteError, InputError, InterruptedRun, VirnucError
from .pipeline.distributed import RankContext, init_ranks
from .pipeline.fingerprint import MANIFEST, check_or_write_manifest, file_digest, run_fingerprint
from .pipeline.frames_table import read_frames_table
from .pipeline.merge import EMBEDDINGS_H5, merge_parts
from .pipeline.embed_part import embed_stage, injected_fault_ids
from .pipeline.parts import (
    PARTS_DIR,
    failures_path,
    finished_frames,
    part_is_complete,
    part_path,
    read_failure_lines,
    read_part,
    write_part,
)
from .pipeline.shard import assign_parts, plan_parts
from .progress import ProgressReporter
from .report import summarize
from .prep.prepare import CHUNKED_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA, prepare
from .version import __version__

log = logging.getLogger("virnuc_ds.run")

PREP_DIR = "prep"
REPORT = "run_report.json"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="run config, YAML or JSON (see ds_configs/virnuc_ds.yaml); default: built-in defaults")
    p.add_argument("-i", "--input", required=True, help="nucleotide FASTA (.gz accepted)")
    p.add_argument("-m", "--expected-length", type=int, choices=(300, 500), help="chunk length (overrides prepare.expected_length)")
    p.add_argument("-o", "--output-dir", required=True, help="output folder (resumable)")
    p.add_argument("-p", "--classifier", help="classifier checkpoint (overrides models.classifier)")
    p.add_argument("--esm-batch-tokens", type=int, help="override esm2.toks_per_batch")
    p.add_argument("--dnabert-batch-tokens", type=int, help="override dnabert_s.toks_per_batch")
    p.add_argument("--force", action="store_true", help="discard this output folder's earlier results and start over")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when GPUs are visible")
    p.add_argument("--gpus", help="GPU ids, e.g. 0,1,2,3: one rank each under the DeepSpeed launcher "
                   "(default: every visible GPU; ignored inside a launcher)")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def apply_overrides(cfg: Config, args) -> Config:
    if args.expected_length:
        cfg.prepare.expected_length = args.expected_length
    if getattr(args, "classifier", None):
        cfg.models.classifier = str(Path(args.classifier).resolve())
    if getattr(args, "esm_batch_tokens", None):
        cfg.esm2.toks_per_batch = args.esm_batch_tokens
    if getattr(args, "dnabert_batch_tokens", None):
        cfg.dnabert_s.toks_per_batch = args.dnabert_batch_tokens
    if cfg.models.classifier and not Path(cfg.models.classifier).is_file():
        raise InputError(cfg.models.classifier, "classifier checkpoint not found")
    return cfg


def on_main(ctx: RankContext, fn, *a, **kw):
    """Run fn on rank 0 and hand its result (or its error) to every rank, so no rank waits forever."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*a, **kw)
        except VirnucError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised on rank 0
            error = exc
    if ctx.distributed:
        import torch.distributed as dist

        box = [(result, None if error is None else (type(error).__name__, str(error), getattr(error, "exit_code", EXIT_FAILURE)))]
        dist.broadcast_object_list(box, src=0)
        result, err = box[0]
        if err is not None and not ctx.is_main:
            exc = VirnucError(f"rank 0 failed: {err[1]}")
            exc.exit_code = err[2]
            raise exc
    if error is not None:
        raise error
    return result


class StopFlag:
    """SIGTERM/SIGINT set a flag; the rank stops after the part in flight (finished parts are kept).

    A second signal stops at once (KeyboardInterrupt): parts are atomic, so nothing finished is lost."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: stopping after the part in flight (send it again to stop now)", self.signal)

    def check(self, rank: int) -> None:
        if self.signal:
            raise InterruptedRun(f"rank {rank} stopped by {self.signal}; finished parts are kept, rerun the same command to resume")


def _prepare_stage(cfg: Config, input_path: Path, out: Path, force: bool, facts_fn) -> dict:
    """Rank 0: fingerprint check, then prepare unless its outputs are already there."""
    t0 = time.time()
    digest = file_digest(input_path)
    fingerprint, facts = facts_fn(digest)
    if force:
        for name in (PREP_DIR, PARTS_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (MANIFEST, EMBEDDINGS_H5, REPORT, FAILED_FILES, "prediction_results.txt", "prediction_results_highestscore.csv"):
            (out / name).unlink(missing_ok=True)
    new_manifest = not (out / MANIFEST).exists()
    check_or_write_manifest(out, fingerprint, facts, force)
    prep = out / PREP_DIR
    remove_stale_temporaries(prep)
    remove_stale_temporaries(out / PARTS_DIR)
    if all((prep / n).exists() for n in (CHUNKED_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA)):
        log.info("prepare: reusing %s", prep)
        stats = None
    else:
        try:
            stats = prepare(input_path, cfg.prepare.expected_length, prep, workers=cfg.prepare.workers)
            if stats.frames == 0:
                shutil.rmtree(prep, ignore_errors=True)
                raise InputError(input_path, f"no open reading frame: no {cfg.prepare.expected_length}-bp chunk has a "
                                 "frame of at least one codon without a stop codon, so there is nothing to embed")
        except BaseException:
            # bad input leaves no partial output: without this, the corrected input is refused
            # as "another input_sha256" on the rerun
            if new_manifest:
                (out / MANIFEST).unlink(missing_ok=True)
            raise
        stats = stats.__dict__
    return {"fingerprint": fingerprint, "seconds": time.time() - t0, "stats": stats}


def run(args) -> int:
    cfg = apply_overrides(load_config(args.config), args)
    ctx = init_ranks(cfg.run.collective_timeout_minutes, force_cpu=args.cpu)
    stop = StopFlag()
    timings: dict[str, float] = {"startup": _seconds_since_process_start()}  # interpreter, imports, launcher
    progress = None
    try:
        out = Path(args.output_dir)
        input_path = Path(args.input)
        if not input_path.is_file():
            raise InputError(input_path, "file not found")
        ensure_writable_dir(out)

        from .models.dnabert_s import resolve_dnabert_s_folder
        from .models.esm2 import resolve_esm2_checkpoint

        esm2_path = resolve_esm2_checkpoint(cfg.models.esm2)
        dnabert_path = resolve_dnabert_s_folder(cfg.models.dnabert_s)
        esm_dtype = resolve_dtype(cfg.esm2.dtype, ctx.device)
        dna_dtype = resolve_dtype(cfg.dnabert_s.dtype, ctx.device)
        kernel_inject = cfg.esm2.replace_with_kernel_inject and ctx.device.type == "cuda"
        dtypes = {"esm2": str(esm_dtype), "dnabert_s": str(dna_dtype), "device": ctx.device.type, "kernels": kernel_inject}
        if ctx.is_main:
            log.info(
                "virnuc-ds %s: %d rank(s), device %s, ESM-2 %s %s, DNABERT-S %s%s",
                __version__, ctx.world_size, _device_name(ctx.device), "DeepSpeed kernels" if kernel_inject else "eager",
                dtypes["esm2"], dtypes["dnabert_s"],
                "" if kernel_inject or not cfg.esm2.replace_with_kernel_inject else " (kernel injection needs a GPU: eager on CPU)",
            )

        # 1. prepare (rank 0, with every core of its node), shared through the file system
        prep_info = on_main(
            ctx, _prepare_stage, cfg, input_path, out, args.force,
            lambda digest: run_fingerprint(digest, cfg, str(esm2_path), str(dnabert_path), dtypes),
        )
        fingerprint = prep_info["fingerprint"]
        timings["prepare"] = prep_info["seconds"]

        # 2. plan: length-sorted parts, dealt to ranks by tokens
        t0 = time.time()
        frames = read_frames_table(out / PREP_DIR)
        parts = plan_parts(frames.protein_lengths(), cfg.run.frames_per_part)
        mine = assign_parts(parts, ctx.world_size)[ctx.rank]
        todo = [p for p in mine if not part_is_complete(out, p.index, p.frames, fingerprint)]
        timings["plan"] = time.time() - t0
        log.info("%d frames in %d parts; this rank: %d parts, %d to compute", len(frames), len(parts), len(mine), len(todo))
        progress = ProgressReporter(out, ctx.rank, ctx.world_size,
                                    total_frames=sum(len(p.frames) for p in todo), total_parts=len(todo))

        # 3. embed this rank's parts
        if todo:
            t0 = time.time()
            embedders = _load_embedders(cfg, esm2_path, dnabert_path, ctx.device, esm_dtype, dna_dtype, kernel_inject)
            timings["model_load"] = time.time() - t0
            fail_ids = injected_fault_ids(cfg.run.fail_frames)
            totals = {"dnabert_s": 0.0, "esm2": 0.0, "esm2_tokens": 0, "failed_frames": 0}
            for n_done, part in enumerate(todo, start=1):
                stop.check(ctx.rank)
                t_part = time.time()
                part_times = embed_part(out, part, frames, embedders, fingerprint, fail_ids, ctx.device)
                for key, value in part_times.items():
                    totals[key] += value
                progress.part_done(len(part.frames), part_times["esm2_tokens"], time.time() - t_part)
                log.info(
                    "part %d done (%d/%d on this rank): %d frames, ESM-2 %.0f tokens/s%s",
                    part.index, n_done, len(todo), len(part.frames),
                    part_times["esm2_tokens"] / max(part_times["esm2"], 1e-9),
                    f", {part_times['failed_frames']} failed" if part_times["failed_frames"] else "",
                )
                _test_hooks_after_part(n_done)
            timings.update(totals)
            timings["truncated_proteins"] = getattr(embedders[0], "truncated_count", 0)

        # 4. merge, check, classify (rank 0) once every rank is done
        ctx.barrier("embeddings done")
        timings["rank_wall"] = _seconds_since_process_start()
        progress.close()
        all_timings = _gather(ctx, timings)
        on_main(ctx, _finish, cfg, out, frames.ids, fingerprint, dtypes, esm2_path, dnabert_path, all_timings, prep_info)
        return 0
    finally:
        if progress is not None:
            progress.close()
        ctx.close()


FAILED_FILES = "failed_files.txt"


def _collect_failures(out: Path) -> list[str]:
    """Every part's failed frames, written to OUT/failed_files.txt (`item|stage|message`); removed when none."""
    lines = [line for f in sorted((out / PARTS_DIR).glob("part-*.failed.txt")) for line in read_failure_lines(f)]
    if lines:
        with atomic_open(out / FAILED_FILES) as fh:
            fh.write("".join(line + "\n" for line in lines))
    else:
        (out / FAILED_FILES).unlink(missing_ok=True)
    return lines


def _finish(cfg, out, frame_ids, fingerprint, dtypes, esm2_path, dnabert_path, all_timings, prep_info):
    t0 = time.time()
    failures = _collect_failures(out)
    failed_ids = frozenset(line.split("|", 1)[0] for line in failures)
    merge_parts(
        out, frame_ids, fingerprint=fingerprint, failed_ids=failed_ids,
        attrs={"esm2_model": str(esm2_path), "dnabert_s_model": str(dnabert_path), "dtype": json.dumps(dtypes), "fingerprint": fingerprint},
    )
    merge_s = time.time() - t0
    classify_s = None
    if cfg.models.classifier:
        from .classify import classify_embeddings
        from .store.embeddings import read_embeddings

        t0 = time.time()
        classify_embeddings(read_embeddings(out / EMBEDDINGS_H5), cfg.models.classifier, out, device=cfg.classify.device)
        classify_s = time.time() - t0
        log.info("wrote %s and %s", out / "prediction_results.txt", out / "prediction_results_highestscore.csv")
    else:
        for stale in ("prediction_results.txt", "prediction_results_highestscore.csv"):  # from an earlier run
            (out / stale).unlink(missing_ok=True)
        log.info("no classifier configured (models.classifier or --classifier): wrote %s only", out / EMBEDDINGS_H5)
    report = {
        "virnuc_ds_version": __version__,
        "frames": len(frame_ids),
        "fingerprint": fingerprint,
        "dtypes": dtypes,
        "prepare": prep_info,
        "merge_seconds": merge_s,
        "classify_seconds": classify_s,
        "ranks": all_timings,
    }
    report["failed_frames"] = len(failed_ids)
    report["expected_length"] = cfg.prepare.expected_length
    report["versions"] = _versions()
    with atomic_open(out / REPORT) as fh:
        json.dump(report, fh, indent=2)
    print(summarize(report, out), file=sys.stderr)
    if failed_ids:
        raise IncompleteError(
            f"{len(failed_ids)} of {len(frame_ids)} frames failed and are missing from the results "
            f"(listed in {out / FAILED_FILES}); rerun the same command to retry only them"
        )


def embed_part(out: Path, part, frames, embedders, fingerprint: str, fail_ids, device) -> dict:
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
    _sync(device)
    t1 = time.time()
    proteins = [frames.proteins[i] for i in need]
    esm, esm_failed = embed_stage(esm_embedder, "esm2", ids, proteins, fail_ids, esm_width)
    _sync(device)
    t2 = time.time()
    failures = dna_failed + esm_failed
    ok = np.isfinite(dna).all(1) & np.isfinite(esm).all(1)
    rows_index, rows_ids, rows_dna, rows_esm = need[ok], [i for i, good in zip(ids, ok) if good], dna[ok], esm[ok]
    if kept is not None:
        rows_index = np.concatenate([kept["frame_index"], rows_index])
        rows_ids = kept["ids"] + rows_ids
        rows_dna = np.concatenate([kept["dnabert_s"], rows_dna])
        rows_esm = np.concatenate([kept["esm2"], rows_esm])
    position = {int(f): k for k, f in enumerate(part.frames)}
    order = np.argsort([position[int(f)] for f in rows_index], kind="stable")  # the part's own order
    write_part(path, part.index, rows_index[order], [rows_ids[k] for k in order], rows_dna[order], rows_esm[order], fingerprint)
    failed_file = failures_path(out, part.index)
    if failures:
        with atomic_open(failed_file) as fh:
            fh.write("".join(f.line() + "\n" for f in failures))
    else:
        failed_file.unlink(missing_ok=True)
    tokens = sum(esm_embedder.token_count(p) for p in proteins)
    return {"dnabert_s": t1 - t0, "esm2": t2 - t1, "esm2_tokens": tokens, "failed_frames": len({f.item for f in failures})}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"virnuc-ds": __version__, "python": platform.python_version()}
    for dist in ("torch", "deepspeed", "fair-esm", "transformers"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return found


def _test_hooks_after_part(n_done: int) -> None:
    """Crash and signal injection for the kill/SIGTERM tests (environment variables; never set in use).

    VIRNUC_DS_TEST_HOOK_RANK limits them to one global rank."""
    hook_rank = os.environ.get("VIRNUC_DS_TEST_HOOK_RANK")
    if hook_rank is not None and hook_rank != os.environ.get("RANK", "0"):
        return
    if os.environ.get("VIRNUC_DS_TEST_KILL_AFTER_PARTS") == str(n_done):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("VIRNUC_DS_TEST_SIGTERM_AFTER_PARTS") == str(n_done):
        os.kill(os.getpid(), signal.SIGTERM)


def _seconds_since_process_start() -> float:
    try:
        import psutil  # a DeepSpeed dependency

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a timing nicety, never a failure
        return 0.0


def _gather(ctx: RankContext, timings: dict) -> list:
    if not ctx.distributed:
        return [timings]
    import torch.distributed as dist

    box = [None] * ctx.world_size
    dist.all_gather_object(box, timings)
    return box


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    return "cpu"


def _load_embedders(cfg, esm2_path, dnabert_path, device, esm_dtype, dna_dtype, kernel_inject):
    from .embed.dnabert_s import DnabertSEmbedder
    from .embed.esm2 import Esm2Embedder
    from .models.dnabert_s import load_dnabert_s
    from .models.esm2 import load_esm2

    model, alphabet = load_esm2(esm2_path)
    settings = dict(device=device, dtype=esm_dtype, toks_per_batch=cfg.esm2.toks_per_batch, max_residues=cfg.esm2.max_residues)
    try:
        esm = Esm2Embedder(model, alphabet, kernel_inject=kernel_inject, attention=cfg.esm2.attention, **settings)
    except VirnucError as exc:
        if not (kernel_inject and cfg.esm2.fallback_to_eager):
            raise
        log.warning("DeepSpeed kernels unavailable (%s); esm2.fallback_to_eager is set: running fair-esm eager", exc)
        model, alphabet = load_esm2(esm2_path)  # the failed injection may have altered the weights
        esm = Esm2Embedder(model, alphabet, kernel_inject=False, **settings)
    dmodel, tokenizer = load_dnabert_s(dnabert_path)
    dna = DnabertSEmbedder(dmodel, tokenizer, device=device, dtype=dna_dtype, toks_per_batch=cfg.dnabert_s.toks_per_batch)
    return esm, dna, model.embed_dim, dmodel.config.hidden_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virnuc_ds.run", description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # older DeepSpeed launchers pass it
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .cli import configure_logging

    configure_logging(args.verbose)
    try:
        from .launcher import maybe_relaunch

        code = maybe_relaunch(args, list(argv) if argv is not None else sys.argv[1:])
        return run(args) if code is None else code
    except VirnucError as exc:
        print(f"virnuc-ds: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:  # pragma: no cover - ConfigError is a VirnucError
        print(f"virnuc-ds: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
