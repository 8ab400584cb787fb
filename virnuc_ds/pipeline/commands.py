"""Subcommands that run the embedding pipeline: run, merge, make-demo-models."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("virnuc_ds.merge")


def cmd_run(args) -> int:
    from ..launcher import maybe_relaunch
    from ..run import run

    code = maybe_relaunch(args)  # several GPUs: one rank each under the DeepSpeed launcher
    return run(args) if code is None else code


def cmd_merge(args) -> int:
    from ..errors import InputError
    from ..pipeline.finish import REPORT, RESULT_FILES, finish_run
    from ..pipeline.merge import EMBEDDINGS_H5
    from ..pipeline.output_lock import OutputFolderLock
    from ..run import PREP_DIR
    from ..pipeline.fingerprint import MANIFEST
    from ..pipeline.frames_table import read_frame_ids
    from ..config import load_config

    out = Path(args.output_dir)
    manifest = out / MANIFEST
    if not manifest.exists():
        raise InputError(out, f"no {MANIFEST}: not a virnuc-ds run folder")
    facts = json.loads(manifest.read_text())
    cfg = load_config(args.config)
    report_path = out / REPORT
    earlier = json.loads(report_path.read_text()) if report_path.exists() else {}
    if args.classifier:
        cfg.models.classifier = str(Path(args.classifier).resolve())
    elif not cfg.models.classifier and earlier.get("classifier"):
        # the run's own classifier: without one the merge would leave the folder without predictions
        cfg.models.classifier = earlier["classifier"]
        if not Path(cfg.models.classifier).is_file():
            raise InputError(cfg.models.classifier, "the run's classifier is not there any more; pass -p")
        log.info("classifying with the run's classifier %s", cfg.models.classifier)
    elif not cfg.models.classifier and any((out / name).exists() for name in RESULT_FILES):
        log.warning("no classifier (-p, or models.classifier of -c): the folder's predictions are removed "
                    "and only embeddings.h5 is written")
    # the run's own chunk length (the report and plot use it), not the merge config's default
    cfg.prepare.expected_length = facts["facts"].get("expected_length", cfg.prepare.expected_length)
    frame_ids = read_frame_ids(out / PREP_DIR)
    lock = OutputFolderLock(out)  # not while a run works in this folder
    lock.acquire()
    try:
        finish_run(
            cfg, out, frame_ids, facts["fingerprint"], facts["facts"].get("dtypes", {}),
            facts["facts"]["esm2"]["path"], facts["facts"]["dnabert_s"]["path"],
            earlier.get("ranks", []),  # keep the run's own per-rank timings
            earlier.get("prepare", {"fingerprint": facts["fingerprint"]}),
        )
    finally:
        lock.release()
    print(f"merged {len(frame_ids)} frames into {out / EMBEDDINGS_H5}")
    return 0


def cmd_make_demo_models(args) -> int:
    from ..demo import write_demo_models

    paths = write_demo_models(args.output_dir, seed=args.seed)
    print(f"wrote tiny demo models (random weights: their predictions mean nothing) and {paths['config']}")
    return 0


def register(sub) -> None:
    from ..run import add_run_arguments

    s = sub.add_parser("run", help="the whole pipeline: prepare, DNABERT-S + ESM-2 embeddings, merge, classify")
    add_run_arguments(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("merge", help="merge an output folder's rank parts into embeddings.h5, check it, classify")
    s.add_argument("-o", "--output-dir", required=True, help="a run's output folder")
    s.add_argument("-c", "--config", help="run config (for models.classifier and classify.device)")
    s.add_argument("-p", "--classifier", help="classifier checkpoint (default: models.classifier of -c, else the run's own)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("make-demo-models", help="write tiny ESM-2, DNABERT-S and classifier models and a demo config")
    s.add_argument("-o", "--output-dir", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_make_demo_models)

    register_cluster_commands(sub)


def register_cluster_commands(sub) -> None:
    """predict (the VirNucPro refactor's flags), report, plot, build-ops: see launcher.py, report.py, plot.py."""
    from .. import launcher, plot, report

    s = sub.add_parser(
        "predict",
        help="the whole pipeline with the VirNucPro refactor's flags (predict X.fa -m 500 -p 500_model.pth -o OUT)",
        description="Predict viral sequences: `virnuc-ds run` with the flags of the VirNucPro refactor's `predict`. "
        "Uses every visible GPU (one rank each, under the DeepSpeed launcher) unless --gpus or -d says otherwise. "
        "Rerunning resumes from the finished parts. Exit codes: 0 success, 1 failure, 2 incomplete result, "
        "3 stopped by a signal (rerun to resume).",
    )
    launcher.add_predict_arguments(s)
    s.set_defaults(func=launcher.cmd_predict)

    s = sub.add_parser("report", help="print the summary of a finished run (OUT/run_report.json)")
    s.add_argument("output_dir", metavar="OUT", help="a run's output folder")
    s.set_defaults(func=report.cmd_report)

    s = sub.add_parser("plot", help="draw OUT/prediction.png (the original's figure) and OUT/score_histogram.png")
    s.add_argument("output_dir", metavar="OUT", help="a run's output folder (with prediction_results.txt)")
    s.add_argument("-n", "--sequences", type=int, default=5, help="how many input sequences to draw (default 5, in input order)")
    s.set_defaults(func=plot.cmd_plot)

    s = sub.add_parser("build-ops", help="build DeepSpeed's inference op once (per node, before the ranks start)")
    s.set_defaults(func=launcher.cmd_build_ops)
