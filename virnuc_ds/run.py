"""The rank runner's entry point: one process per GPU under the DeepSpeed launcher, or one process.

    deepspeed --num_gpus 4 --module virnuc_ds.run --config C --input X.fa --expected-length 500 --output-dir OUT
    python -m virnuc_ds.run ...            (one rank, no launcher)
    virnuc-ds run ...                      (the same, from the console script)

The stages live in virnuc_ds/pipeline/ (runner.py calls them in order). This module imports
nothing heavy: worker processes started with `spawn` (prepare's pool, the background merge)
re-import the main module, and importing torch there would cost every worker seconds.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ArgumentParser, batch_tokens

PREP_DIR = "prep"


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="run config, YAML or JSON (see ds_configs/virnuc_ds.yaml); default: built-in defaults")
    p.add_argument("-i", "--input", required=True, help="nucleotide FASTA (.gz accepted)")
    p.add_argument("-m", "--expected-length", type=int, choices=(300, 500), help="chunk length (overrides prepare.expected_length)")
    p.add_argument("-o", "--output-dir", required=True, help="output folder (resumable)")
    p.add_argument("-p", "--classifier", help="classifier checkpoint (overrides models.classifier)")
    p.add_argument("--esm-batch-tokens", type=batch_tokens, help="override esm2.toks_per_batch (at least 1024)")
    p.add_argument("--dnabert-batch-tokens", type=batch_tokens, help="override dnabert_s.toks_per_batch (at least 1024)")
    p.add_argument("--force", action="store_true", help="discard this output folder's earlier results and start over")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when GPUs are visible")
    p.add_argument("--gpus", help="GPU ids, e.g. 0,1,2,3: one rank each under the DeepSpeed launcher "
                   "(default: every visible GPU; ignored inside a launcher)")


def run(args) -> int:
    """Run this rank's share of the pipeline (see virnuc_ds.pipeline.runner)."""
    from .pipeline.runner import run as run_rank

    return run_rank(args)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="virnuc_ds.run", description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # older DeepSpeed launchers pass it
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .cli import configure_logging, reporting_errors

    configure_logging(args.verbose)

    def relaunch_or_run(args) -> int:
        from .launcher import maybe_relaunch

        code = maybe_relaunch(args, list(argv) if argv is not None else sys.argv[1:])
        return run(args) if code is None else code

    code = reporting_errors(relaunch_or_run, args)
    if argv is None:  # the program, not a caller: nothing may change the exit code now
        from .errors import ignore_signals_once_decided

        ignore_signals_once_decided()
    return code


def exit_rank(code: int) -> None:
    """Leave a rank of a distributed run without the interpreter's teardown.

    Every output is fsync'd and the process group is gone by now; what remains of teardown can
    only do harm: once in CI a rank aborted there after a run that had succeeded ("terminate
    called without an active exception", exit -6; most likely the C++ destructor of a process
    group still referenced from Python, e.g. by DeepSpeed's comm layer, running while gloo's
    threads are joinable)."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_rank(exit_code)
    sys.exit(exit_code)
