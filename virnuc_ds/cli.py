"""`virnuc-ds` command line: one subcommand per pipeline stage, plus the whole run.

Exit codes: 0 success, 1 failure (bad input, missing file, bad config, bad command line), 2 partial
or incomplete result, 3 stopped by a signal (finished work kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .atomic import ensure_writable_dir, is_absent, remove_if_left_empty
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, ArgumentParser, VirnucError, ignore_signals_once_decided
from .version import __version__

log = logging.getLogger("virnuc_ds")


def cmd_prepare(args) -> int:
    from .prep.prepare import prepare

    out_is_new = is_absent(args.output_dir)
    out = ensure_writable_dir(args.output_dir)
    try:
        stats = prepare(args.input, args.expected_length, out, workers=args.workers)
    except VirnucError:
        if out_is_new:  # refused input: no folder left behind either
            remove_if_left_empty(out)
        raise
    print(f"{stats.records} records -> {stats.chunks} chunks -> {stats.frames} frames in {out}")
    return 0


def cmd_import_legacy(args) -> int:
    from .store.embeddings import write_embeddings
    from .store.legacy import import_legacy, read_legacy_merged

    if args.merged:
        if args.dnabert or args.esm:
            raise VirnucError("give either --merged, or --dnabert with --esm, not both")
        emb = read_legacy_merged(args.merged)
    elif args.dnabert and args.esm:
        emb = import_legacy(args.dnabert, args.esm)
    else:
        raise VirnucError("import-legacy needs --dnabert X_DNABERT_S.pt and --esm X_ESM.pt (or --merged X_merged.pt)")
    ensure_writable_dir(str(Path(args.output).parent))
    write_embeddings(args.output, emb, dnabert_s_model="legacy", esm2_model="legacy", dtype="float32")
    print(f"imported {len(emb)} frames into {args.output}")
    return 0


def cmd_classify(args) -> int:
    import numpy as np

    from .classify import classify_embeddings
    from .errors import InputError
    from .store.embeddings import finite_rows, read_embeddings

    emb = read_embeddings(args.embeddings)
    finite = finite_rows(emb.dnabert_s, emb.esm2)  # [N]
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InputError(args.embeddings, f"{len(bad)} of {len(emb)} frames have NaN or Inf embeddings; "
                         "the classifier cannot score them", record=emb.ids[int(bad[0])])
    out = ensure_writable_dir(args.output_dir)
    paths = classify_embeddings(emb, args.classifier, out, device=args.device)
    print(f"classified {len(emb)} frames: {paths[0]} and {paths[1]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="virnuc-ds",
        description="VirNucPro's embedding and prediction steps on DeepSpeed-Inference, on every GPU of a node.",
    )
    p.add_argument("--version", action="version", version=f"virnuc-ds {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare", help="chunk a FASTA and translate six frames (the original's preprocessing)")
    s.add_argument("-i", "--input", required=True, help="nucleotide FASTA (.gz accepted)")
    s.add_argument("-m", "--expected-length", type=int, choices=(300, 500), required=True, help="chunk length")
    s.add_argument("-o", "--output-dir", required=True, help="writes chunked.fa, identified_nucleotide.fa, identified_protein.faa")
    s.add_argument("-w", "--workers", type=int, default=0, help="processes (default: all CPUs)")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("import-legacy", help="convert the original tool's *_DNABERT_S.pt + *_ESM.pt into an embeddings .h5")
    s.add_argument("--dnabert", help="X_DNABERT_S.pt written by the original")
    s.add_argument("--esm", help="X_ESM.pt written by the original")
    s.add_argument("--merged", help="X_merged.pt written by the original (instead of the two above)")
    s.add_argument("-o", "--output", required=True, help="embeddings HDF5 to write")
    s.set_defaults(func=cmd_import_legacy)

    s = sub.add_parser("classify", help="classify an embeddings .h5 with the original's MLP checkpoint")
    s.add_argument("-e", "--embeddings", required=True, help="embeddings HDF5 (from run, merge or import-legacy)")
    s.add_argument("-p", "--classifier", required=True, help="300_model.pth / 500_model.pth or a state_dict")
    s.add_argument("-o", "--output-dir", required=True, help="writes prediction_results.txt and prediction_results_highestscore.csv")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    s.set_defaults(func=cmd_classify)

    _add_pipeline_commands(sub)
    return p


def _add_pipeline_commands(sub) -> None:
    """Commands that need the embedding models (registered here, implemented in pipeline/)."""
    try:
        from .pipeline import commands
    except ImportError:  # pragma: no cover - during development only
        return
    commands.register(sub)


QUIET_ENV = "VIRNUC_DS_QUIET"  # set by `predict --quiet`; inherited by the launcher's ranks and prepare's process


def configure_logging(verbose: bool = False) -> None:
    """Log lines carry the global rank, so the interleaved output of many ranks stays readable."""
    rank = os.environ.get("RANK", "0")
    quiet = os.environ.get(QUIET_ENV) == "1"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format=f"%(asctime)s rank{rank} %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    code = reporting_errors(args.func, args)
    if argv is None:  # the program, not a caller: nothing may change the exit code now
        ignore_signals_once_decided()
    return code


def reporting_errors(func, args) -> int:
    """func(args)'s exit code; an error the user can act on becomes one line and its exit code."""
    try:
        return int(func(args) or 0)
    except VirnucError as exc:
        message = " ".join(str(exc).split())  # one line, whatever a library's message held
        print(f"virnuc-ds: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("virnuc-ds: interrupted; finished parts are kept, rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"virnuc-ds: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
