"""The end of a run (rank 0): merge the parts, check completeness, classify, write the report.

OUT/failed_files.txt lists frames that failed (`item|stage|message`); when there are any, the
results hold the rest and the run ends with IncompleteError (exit code 2).
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from ..atomic import atomic_open
from ..classify.predict import HIGHEST_CSV, RESULTS_TXT
from ..errors import IncompleteError
from ..report import summarize
from ..version import __version__
from .merge import EMBEDDINGS_H5, merge_parts
from .parts import all_failure_lines, failed_ids_of

log = logging.getLogger("virnuc_ds.run")

REPORT = "run_report.json"
FAILED_FILES = "failed_files.txt"
RESULT_FILES = (RESULTS_TXT, HIGHEST_CSV)


def collect_failures(out: Path) -> list[str]:
    """Every part's failed frames, written to OUT/failed_files.txt (`item|stage|message`); removed when none."""
    lines = all_failure_lines(out)
    if lines:
        with atomic_open(out / FAILED_FILES) as fh:
            fh.write("".join(line + "\n" for line in lines))
    else:
        (out / FAILED_FILES).unlink(missing_ok=True)
    return lines


def merge_attrs(esm2_path, dnabert_path, dtypes, fingerprint) -> dict:
    return {"esm2_model": str(esm2_path), "dnabert_s_model": str(dnabert_path), "dtype": json.dumps(dtypes), "fingerprint": fingerprint}


def finish_run(cfg, out, frame_ids, fingerprint, dtypes, esm2_path, dnabert_path, all_timings, prep_info,
               background_merge=None, settle_seconds: float = 0.0):
    """Rank 0, once every rank is done: merge + completeness check, classify, write the run report.

    background_merge: the BackgroundMerge that took parts up while the ranks computed; without one
    (or if it died) the parts are merged and classified here. settle_seconds: how long to look again
    for parts other nodes wrote (merge.PART_VISIBILITY_SECONDS in a run of several nodes)."""
    t0 = time.time()
    for stale in RESULT_FILES:  # an earlier run's, maybe
        (out / stale).unlink(missing_ok=True)  # of another classifier: none is better than those if this run fails
    failed_ids = failed_ids_of(collect_failures(out))
    merged = background_merge.finish(failed_ids, settle_seconds) if background_merge is not None else None
    if merged is None:
        merged = merge_parts(out, list(frame_ids), merge_attrs(esm2_path, dnabert_path, dtypes, fingerprint), fingerprint,
                             failed_ids, cfg.models.classifier, cfg.classify.device, settle_seconds)
    if settle_seconds:  # the merge may have seen failure lists of other nodes that showed up late
        failed_ids = failed_ids_of(collect_failures(out))
    merge_s = time.time() - t0  # the wait for the merge after the last part (the whole merge without a background one)
    if cfg.models.classifier:
        log.info("wrote %s and %s", out / RESULTS_TXT, out / HIGHEST_CSV)
    else:
        log.info("no classifier configured (models.classifier or --classifier): wrote %s only", out / EMBEDDINGS_H5)
    classify_s = merged["classify_busy_seconds"] if cfg.models.classifier else None
    report = {
        "virnuc_ds_version": __version__,
        "frames": len(frame_ids),
        "fingerprint": fingerprint,
        "dtypes": dtypes,
        "prepare": prep_info,
        "merge_seconds": merge_s,
        "classify_seconds": classify_s,
        "merge": merged,
        "ranks": all_timings,
    }
    report["failed_frames"] = len(failed_ids)
    report["expected_length"] = cfg.prepare.expected_length
    # what `virnuc-ds merge` classifies with when not told (absolute: merge may run from elsewhere)
    report["classifier"] = str(Path(cfg.models.classifier).resolve()) if cfg.models.classifier else None
    report["versions"] = versions()
    with atomic_open(out / REPORT) as fh:
        json.dump(report, fh, indent=2)
    if log.isEnabledFor(logging.INFO):  # not under `predict --quiet`
        print(summarize(report, out), file=sys.stderr)
    if failed_ids:
        raise IncompleteError(
            f"{len(failed_ids)} of {len(frame_ids)} frames failed and are missing from the results "
            f"(listed in {out / FAILED_FILES}); rerun the same command to retry only them"
        )


def versions() -> dict:
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
