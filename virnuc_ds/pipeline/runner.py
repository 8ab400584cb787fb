"""The rank runner's stages in order (entry point: virnuc_ds/run.py).

  check the output folder (rank 0)  -> fingerprint of input, config and models; --force clears
     (a fresh run's ranks start loading their models before this, while the process group forms)
  prepare (rank 0, all CPU cores)   -> OUT/prep/{chunked.fa, identified_nucleotide.fa, identified_protein.faa}
     in a process of its own, while every rank loads its models
  plan parts + assign to ranks      -> pipeline/shard.py (length-sorted, token-balanced, any world size)
  embed my parts                    -> OUT/parts/part-NNNNNN.h5 (atomic, one per finished part)
     while rank 0's background merge scatters finished parts into OUT/embeddings.h5 and classifies them
  finish (rank 0)                   -> completeness check, OUT/embeddings.h5, prediction_results.txt,
                                       prediction_results_highestscore.csv, run_report.json
Rerunning the same command resumes: finished parts are skipped. `--force` starts over.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from ..atomic import ensure_writable_dir, is_absent, remove_if_left_empty, remove_stale_temporaries
from ..config import Config, load_config
from ..errors import InputError, InterruptedRun, ModelNotFoundError, VirnucError
from ..launcher import BYTECODE_HINT, missing_bytecode_caches
from ..prep.prepare import CHUNKED_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA
from ..plot import HISTOGRAM_PNG, PREDICTION_PNG
from ..progress import PROGRESS_DIR, ProgressReporter
from ..run import PREP_DIR
from ..version import __version__
from .distributed import join_ranks, place_rank
from .embed_part import embed_part, injected_fault_ids, load_embedders
from .fingerprint import MANIFEST, check_or_write_manifest, file_digest, run_fingerprint
from .finish import FAILED_FILES, REPORT, RESULT_FILES, finish_run, merge_attrs
from .frames_table import read_frames_table
from .merge import EMBEDDINGS_H5, PART_VISIBILITY_SECONDS, BackgroundMerge
from .output_lock import LOCK_FILE, OutputFolderLock
from .parts import PARTS_DIR, PartFinisher, part_is_complete
from .prepare_stage import PrepareInBackground, PrepareProcessLost
from .shard import assign_parts, plan_parts

log = logging.getLogger("virnuc_ds.run")

RUN_RESULTS = (EMBEDDINGS_H5, REPORT, FAILED_FILES, *RESULT_FILES)  # beside OUT/parts/: what a run finished

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def check_classifier(cfg: Config) -> int | None:
    """The classifier's input width, read before any GPU work (a bad checkpoint found only at the
    run's end would have cost its whole GPU time); None without a classifier."""
    if not cfg.models.classifier:
        return None
    from ..classify import pick_device
    from ..classify.mlp import load_classifier

    pick_device(cfg.classify.device)  # classify.device: cuda on a machine without one is an error now
    name = Path(cfg.models.classifier).name
    if name[:4] in ("300_", "500_") and int(name[:3]) != cfg.prepare.expected_length:
        log.warning("%s looks like the classifier for %s-bp chunks, but the chunk length is %d (-m)",
                    cfg.models.classifier, name[:3], cfg.prepare.expected_length)
    return load_classifier(cfg.models.classifier, expected_input_dim=None).input_dim


def _check_classifier_fits(cfg: Config, classifier_width: int | None, embedders) -> None:
    """The classifier takes DNABERT-S's and ESM-2's widths together, checked once the models are known."""
    _, _, esm_width, dna_width = embedders
    if classifier_width is not None and classifier_width != dna_width + esm_width:
        raise InputError(cfg.models.classifier, f"classifier takes {classifier_width} features but the models give "
                         f"{dna_width + esm_width} (DNABERT-S {dna_width} + ESM-2 {esm_width})")


class StopFlag:
    """SIGTERM/SIGINT set a flag; the rank stops after the part in flight (finished parts are kept).

    A Ctrl-C (SIGINT) after that stops at once (KeyboardInterrupt): parts are atomic, so nothing
    finished is lost. A repeated SIGTERM does not: DeepSpeed's launcher sends one to every rank still
    running when the first rank stops (exit code 3), and a scheduler may signal both the launcher and
    the ranks; each rank then still finishes its part in flight (the launcher kills it 30 s later)."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if self.signal:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum).name
        log.warning("%s received: stopping after the part in flight (Ctrl-C to stop now)", self.signal)

    def check(self, rank: int) -> None:
        if self.signal:
            raise InterruptedRun(f"rank {rank} stopped by {self.signal}; finished parts are kept, rerun the same command to resume")


def _check_output_folder(cfg: Config, input_path: Path, out: Path, force: bool, facts_fn, lock: OutputFolderLock) -> dict:
    """Rank 0: the folder's lock (one run at a time), fingerprint check (another input/config/models
    in this folder is refused unless --force), stale temporaries removed; says whether prepare's
    outputs are already there."""
    lock.acquire()
    digest = file_digest(input_path)
    fingerprint, facts = facts_fn(digest)
    if force:  # everything a run or its follow-up commands (plot) write, so nothing stale stays beside the new results
        for name in (PREP_DIR, PARTS_DIR, PROGRESS_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (MANIFEST, *RUN_RESULTS, PREDICTION_PNG, HISTOGRAM_PNG):
            (out / name).unlink(missing_ok=True)
    new_manifest = not (out / MANIFEST).exists()
    finished_work = any((out / name).exists() for name in RUN_RESULTS) or any((out / PARTS_DIR).glob("part-*"))
    fingerprint, replaced = check_or_write_manifest(out, fingerprint, facts, force, has_results=finished_work)
    if replaced:
        log.info("%s: the earlier run here finished nothing; starting afresh with this setup", out)
        shutil.rmtree(out / PREP_DIR, ignore_errors=True)  # it may be another input's
        new_manifest = True
    prep = out / PREP_DIR
    remove_stale_temporaries(out)
    remove_stale_temporaries(prep)
    remove_stale_temporaries(out / PARTS_DIR)
    prepared = all((prep / n).exists() for n in (CHUNKED_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA))
    return {"fingerprint": fingerprint, "prepared": prepared, "new_manifest": new_manifest}


def _resolve_model(resolver, value: str, cfg: Config) -> Path:
    """resolver(value); when nothing is found, the error also names the config file's folder, where
    a relative path was looked for first (config.load_config)."""
    try:
        return resolver(value)
    except ModelNotFoundError as exc:
        config_file = Path(cfg.source)
        if Path(value).is_absolute() or not config_file.is_file():
            raise
        raise ModelNotFoundError(exc.what, [config_file.parent / value, *exc.searched]) from None


def _models_and_numerics(cfg: Config, device: torch.device) -> tuple[Path, Path, torch.dtype, torch.dtype, bool]:
    """(ESM-2 checkpoint, DNABERT-S folder, their dtypes, whether ESM-2 runs on DeepSpeed's kernels)."""
    from ..models.dnabert_s import resolve_dnabert_s_folder
    from ..models.esm2 import resolve_esm2_checkpoint

    esm2_path = _resolve_model(resolve_esm2_checkpoint, cfg.models.esm2, cfg)
    dnabert_path = _resolve_model(resolve_dnabert_s_folder, cfg.models.dnabert_s, cfg)
    kernel_inject = cfg.esm2.replace_with_kernel_inject and device.type == "cuda"
    return esm2_path, dnabert_path, resolve_dtype(cfg.esm2.dtype, device), resolve_dtype(cfg.dnabert_s.dtype, device), kernel_inject


def _load_models(cfg: Config, device: torch.device, timings: dict, models: tuple):
    """The embedders; models: what _models_and_numerics resolved."""
    esm2_path, dnabert_path, esm_dtype, dna_dtype, kernel_inject = models
    t0 = time.time()
    loaded = load_embedders(cfg, esm2_path, dnabert_path, device, esm_dtype, dna_dtype, kernel_inject, timings)
    timings["model_load"] = time.time() - t0
    return loaded


def _load_models_early(cfg: Config, args, placement, timings: dict) -> concurrent.futures.Future | None:
    """A fresh distributed run (no manifest in the output folder, or --force) starts loading its models
    in a thread before the process group forms: the rendezvous waits for the slowest rank's imports
    and then takes a few tenths of a second more, and rank 0 checks the output folder after it.
    A daemon thread: on an error path the rank leaves without waiting for it (distributed ranks
    end with os._exit). Resumed runs load only if parts remain, as before."""
    if not placement.distributed:
        return None
    try:
        if not (args.force or not (Path(args.output_dir) / MANIFEST).exists()):
            return None
        models = _models_and_numerics(cfg, placement.device)  # a missing model is reported in order, below
    except (OSError, VirnucError):  # reported in order below (an unusable output folder, a missing model)
        return None
    future: concurrent.futures.Future = concurrent.futures.Future()

    def load() -> None:
        try:
            if placement.device.type == "cuda":
                torch.cuda.set_device(placement.device)  # the current device is per thread: never GPU 0 by default
            future.set_result(_load_models(cfg, placement.device, timings, models))
        except BaseException as exc:  # noqa: BLE001 - raised where the rank waits for the models
            future.set_exception(exc)

    threading.Thread(target=load, name="model-load-early", daemon=True).start()
    return future


def run(args) -> int:
    imports = _seconds_since_process_start()  # interpreter and imports
    cfg = apply_overrides(load_config(args.config), args)
    classifier_width = check_classifier(cfg)
    t0 = time.time()
    placement = place_rank(force_cpu=args.cpu)
    timings: dict[str, float] = {"imports": imports}
    early_models = _load_models_early(cfg, args, placement, timings)
    ctx = join_ranks(placement, cfg.run.collective_timeout_minutes, backend_setting=cfg.run.process_group)
    stop = StopFlag()
    timings.update(process_group=time.time() - t0, startup=_seconds_since_process_start())  # interpreter, imports, process group
    progress = merger = finisher = None
    output_lock = OutputFolderLock(args.output_dir)  # taken by rank 0 only
    out = Path(args.output_dir)
    out_is_new = is_absent(out)
    try:
        input_path = Path(args.input)
        if not input_path.is_file():
            raise InputError(input_path, "file not found")
        ensure_writable_dir(out)

        models = _models_and_numerics(cfg, ctx.device)
        esm2_path, dnabert_path, esm_dtype, dna_dtype, kernel_inject = models
        dtypes = {"esm2": str(esm_dtype), "dnabert_s": str(dna_dtype), "device": ctx.device.type, "kernels": kernel_inject}
        if ctx.is_main:
            log.info(
                "virnuc-ds %s: %d rank(s), device %s, ESM-2 %s %s, DNABERT-S %s%s",
                __version__, ctx.world_size, _device_name(ctx.device), "DeepSpeed kernels" if kernel_inject else "eager",
                dtypes["esm2"], dtypes["dnabert_s"],
                "" if kernel_inject or not cfg.esm2.replace_with_kernel_inject else " (kernel injection needs a GPU: eager on CPU)",
            )
            if missing_bytecode_caches():
                log.warning(BYTECODE_HINT)

        def load_models():
            if early_models is not None:
                t_wait = time.time()
                loaded = early_models.result()
                timings["model_load_wait"] = time.time() - t_wait
                return loaded
            return _load_models(cfg, ctx.device, timings, models)

        # 1. the output folder: fingerprint check (rank 0), shared with every rank
        check = ctx.on_main(
            _check_output_folder, cfg, input_path, out, args.force,
            lambda digest: run_fingerprint(digest, cfg, str(esm2_path), str(dnabert_path), dtypes), output_lock,
        )
        fingerprint = check["fingerprint"]

        # 2. prepare (rank 0, every core of its node, in a process of its own) while every rank loads its
        #    models; a resumed run has its prep already and loads models only if parts remain
        embedders = None
        if check["prepared"]:
            log.info("prepare: reusing %s", out / PREP_DIR)
            prep_info = {"fingerprint": fingerprint, "seconds": 0.0, "stats": None}
        else:
            job = PrepareInBackground(cfg, input_path, out, check, getattr(args, "verbose", False)) if ctx.is_main else None

            def prepare_result() -> dict:
                try:
                    return job.result()
                except PrepareProcessLost:
                    if check["new_manifest"]:  # as prepare does on bad input: a rerun with another input is not refused
                        (out / MANIFEST).unlink(missing_ok=True)
                    if stop.signal:  # the signal reached prepare's process too (e.g. sent to the job's processes)
                        raise InterruptedRun(f"stopped by {stop.signal} during prepare; rerun the same command to resume") from None
                    raise

            try:
                embedders = load_models()
            except KeyboardInterrupt:  # told twice: stop now, prepare included
                if job is not None:
                    job.abandon()
                raise
            finally:
                t_wait = time.time()
                prep_info = ctx.on_main(prepare_result if job is not None else None)
                timings["prepare_wait"] = time.time() - t_wait
        timings["prepare"] = prep_info["seconds"]

        # 3. plan: length-sorted parts, dealt to ranks by tokens
        t0 = time.time()
        frames = read_frames_table(out / PREP_DIR, check_ids=check["prepared"])  # a fresh prep is consistent
        parts = plan_parts(frames.protein_lengths(), cfg.run.frames_per_part)
        mine = assign_parts(parts, ctx.world_size)[ctx.rank]
        todo = [p for p in mine if not part_is_complete(out, p.index, p.frames, fingerprint)]
        timings["plan"] = time.time() - t0
        timings["parts_computed"] = [p.index for p in todo]  # which parts this rank embeds (run_report.json)
        log.info("%d frames in %d parts; this rank: %d parts, %d to compute", len(frames), len(parts), len(mine), len(todo))
        progress = ProgressReporter(out, ctx.rank, ctx.world_size,
                                    total_frames=sum(len(p.frames) for p in todo), total_parts=len(todo))
        if ctx.is_main and cfg.run.background_merge:
            merger = BackgroundMerge(out, out / PREP_DIR, fingerprint, merge_attrs(esm2_path, dnabert_path, dtypes, fingerprint),
                                     cfg.models.classifier, cfg.classify.device)

        # 4. embed this rank's parts
        if todo:
            if embedders is None:
                embedders = load_models()
            _check_classifier_fits(cfg, classifier_width, embedders)
            timings["ready"] = _seconds_since_process_start()  # the first GPU batch starts now
            fail_ids = injected_fault_ids(cfg.run.fail_frames)
            totals: collections.Counter = collections.Counter()  # embed_part's seconds and counts, summed
            finisher = PartFinisher()  # write, fsync and rename finished parts off the GPU's path
            for n_done, part in enumerate(todo, start=1):
                stop.check(ctx.rank)
                t_part = time.time()
                part_times = embed_part(out, part, frames, embedders, fingerprint, fail_ids, ctx.device, finisher)
                totals.update(part_times)
                progress.part_done(len(part.frames), part_times["esm2_tokens"], time.time() - t_part)
                log.info(
                    "part %d done (%d/%d on this rank): %d frames, ESM-2 %.0f tokens/s%s",
                    part.index, n_done, len(todo), len(part.frames),
                    part_times["esm2_tokens"] / max(part_times["esm2"], 1e-9),
                    f", {part_times['failed_frames']} failed" if part_times["failed_frames"] else "",
                )
                _test_hooks_after_part(n_done, finisher)
            finisher.close()
            finisher = None
            timings.update(totals)
            timings["truncated_proteins"] = getattr(embedders[0], "truncated_count", 0)
            timings["embedded"] = _seconds_since_process_start()  # the last GPU batch is done
        embedders = None
        if early_models is not None and not early_models.done():  # loaded for nothing: every part was done
            concurrent.futures.wait([early_models])  # before its timings are gathered

        # 5. merge, check, classify (rank 0) once every rank is done
        ctx.barrier("embeddings done")
        timings["rank_wall"] = _seconds_since_process_start()
        progress.close()
        all_timings = ctx.gather(timings)
        several_nodes = ctx.world_size > ctx.local_world_size  # parts from other nodes, seen through a network file system
        ctx.on_main(finish_run, cfg, out, frames.ids, fingerprint, dtypes, esm2_path, dnabert_path, all_timings, prep_info, merger,
                    PART_VISIBILITY_SECONDS if several_nodes else 0.0)
        merger = None
        ctx.close(drain=True)
        return 0
    except BaseException as exc:
        if getattr(exc, "all_ranks", False):  # e.g. frames failed (exit 2): all ranks are here together
            ctx.close(drain=True)
        if isinstance(exc, InputError) and out_is_new and ctx.is_main:  # bad input: leave no folder behind
            output_lock.release()
            remove_if_left_empty(out, (PREP_DIR, LOCK_FILE))  # prep/ only if empty
        raise
    finally:
        if finisher is not None:  # stopped or failed mid-way: keep every part already finished
            try:
                finisher.close()
            except Exception as exc:  # noqa: BLE001 - the error already on its way out matters more
                log.warning("a finished part could not be put in place (%s); it will be recomputed", exc)
        if merger is not None:
            merger.abandon()
        if progress is not None:
            progress.close()
        output_lock.release()
        ctx.close()


def _test_hooks_after_part(n_done: int, finisher) -> None:
    """Crash and signal injection for the kill/SIGTERM tests (environment variables; never set in use):
    they strike once the n-th part is on disk. VIRNUC_DS_TEST_HOOK_RANK limits them to one global rank."""
    hook_rank = os.environ.get("VIRNUC_DS_TEST_HOOK_RANK")
    if hook_rank is not None and hook_rank != os.environ.get("RANK", "0"):
        return
    if n_done in (_int_env("VIRNUC_DS_TEST_KILL_AFTER_PARTS"), _int_env("VIRNUC_DS_TEST_SIGTERM_AFTER_PARTS")):
        finisher.drain()
    if os.environ.get("VIRNUC_DS_TEST_KILL_AFTER_PARTS") == str(n_done):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("VIRNUC_DS_TEST_SIGTERM_AFTER_PARTS") == str(n_done):
        os.kill(os.getpid(), signal.SIGTERM)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


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
