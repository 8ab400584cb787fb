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
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from .atomic import ensure_writable_dir, remove_stale_temporaries
from .config import Config, load_config
from .errors import EXIT_FAILURE, ConfigError, InputError, InterruptedRun, VirnucError
from .pipeline.distributed import init_ranks
from .pipeline.embed_part import embed_part, injected_fault_ids, load_embedders
from .pipeline.fingerprint import MANIFEST, check_or_write_manifest, file_digest, run_fingerprint
from .pipeline.finish import FAILED_FILES, REPORT, finish_run
from .pipeline.frames_table import read_frames_table
from .pipeline.merge import EMBEDDINGS_H5
from .pipeline.parts import PARTS_DIR, part_is_complete
from .pipeline.shard import assign_parts, plan_parts
from .prep.prepare import CHUNKED_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA, prepare
from .progress import ProgressReporter
from .version import __version__

log = logging.getLogger("virnuc_ds.run")

PREP_DIR = "prep"
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
        prep_info = ctx.on_main(
            _prepare_stage, cfg, input_path, out, args.force,
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
            embedders = load_embedders(cfg, esm2_path, dnabert_path, ctx.device, esm_dtype, dna_dtype, kernel_inject)
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
        all_timings = ctx.gather(timings)
        ctx.on_main(finish_run, cfg, out, frames.ids, fingerprint, dtypes, esm2_path, dnabert_path, all_timings, prep_info)
        ctx.close(drain=True)
        return 0
    except BaseException as exc:
        if getattr(exc, "all_ranks", False):  # e.g. frames failed (exit 2): all ranks are here together
            ctx.close(drain=True)
        raise
    finally:
        if progress is not None:
            progress.close()
        ctx.close()


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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    return "cpu"


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
