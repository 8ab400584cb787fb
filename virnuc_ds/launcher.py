"""Start the DeepSpeed launcher for the user: `virnuc-ds run --gpus 0,1,2,3`, `virnuc-ds predict`.

`virnuc-ds run` on a machine with several GPUs (or with `--gpus 0,1,...`) re-runs itself as

    python -m deepspeed.launcher.runner --include localhost:0,1,2,3 --master_port <free port> \
        --module virnuc_ds.run <the same run arguments, less --gpus>

and returns the launcher's exit code. With no GPU, one GPU, `--cpu`, or inside a launcher (RANK or
LOCAL_RANK set) it runs in this process. GPU ids are the machine's, as in CUDA_VISIBLE_DEVICES.

SIGTERM or SIGINT (Ctrl-C) sent to this process goes on to the ranks only, which stop after the
part in flight (exit code 3; rerun to resume). The launcher runs in its own session, so a terminal's
Ctrl-C reaches the ranks through here, not directly (DeepSpeed's launcher, signalled itself, kills
its ranks 30 s later whatever they are doing). A second signal stops everything at once.

`virnuc-ds predict` takes the flags of the VirNucPro refactor's `predict` (broadinstitute/virnucpro-broad)
and maps them onto `run`. `virnuc-ds build-ops` builds DeepSpeed's inference op once per node.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .errors import EXIT_INTERRUPTED, ArgumentParser, VirnucError, batch_tokens

log = logging.getLogger("virnuc_ds.launcher")

LAUNCHER_MODULE = "deepspeed.launcher.launch"  # the per-node process whose children are the ranks


# ------------------------------------------------------------------------------------------------
# Which GPUs
# ------------------------------------------------------------------------------------------------


def parse_gpu_list(spec: str) -> list[str]:
    """'0,1,3' -> ['0', '1', '3']; raises VirnucError on anything else."""
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not ids or not all(s.isdigit() for s in ids):
        raise VirnucError(f"--gpus {spec!r}: expected comma-separated GPU ids such as 0,1,2,3 (or 'all')")
    if len(set(ids)) != len(ids):
        raise VirnucError(f"--gpus {spec!r}: a GPU id is listed twice")
    return [str(int(s)) for s in ids]


def visible_gpu_ids() -> list[str]:
    """The GPUs this process may use, as the machine numbers them (CUDA_VISIBLE_DEVICES if set)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [s.strip() for s in visible.split(",") if s.strip()]
        if not all(s.isdigit() for s in ids):  # UUIDs or MIG names: let torch count them
            ids = None
    else:
        ids = None
    import torch  # noqa: PLC0415 - only when GPUs are asked about

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ids is None:
        return [str(i) for i in range(count)]
    return ids[:count]


def select_gpus(spec: str | None) -> list[str]:
    """GPU ids for the run: --gpus as given, or every visible GPU when --gpus is absent or 'all'."""
    if spec is None or spec.strip().lower() == "all":
        ids = visible_gpu_ids()
        if spec is not None and not ids:
            raise VirnucError("--gpus all: no CUDA GPU is visible on this machine")
        return ids
    ids = parse_gpu_list(spec)
    if len(ids) == 1:
        # one GPU: run in this process on it (set before CUDA is initialised)
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[0]
    if not visible_gpu_ids():
        raise VirnucError(f"--gpus {spec}: no CUDA GPU is visible on this machine")
    return ids


def under_launcher(environ=os.environ) -> bool:
    return "RANK" in environ or "LOCAL_RANK" in environ


# ------------------------------------------------------------------------------------------------
# The command line handed to the ranks
# ------------------------------------------------------------------------------------------------


def strip_gpus(argv: list[str]) -> list[str]:
    """The run arguments without `--gpus X` / `--gpus=X`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def run_argv_from_args(args) -> list[str]:
    """Rebuild `virnuc_ds.run` arguments from a parsed namespace (values that differ from the defaults)."""
    from .run import add_run_arguments  # noqa: PLC0415

    parser = argparse.ArgumentParser(add_help=False)
    add_run_arguments(parser)
    argv: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse's documented-in-practice list of options
        if not action.option_strings or action.dest in ("help", "gpus"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is False or value == action.default:
            continue
        flag = max(action.option_strings, key=len)  # the long form
        argv += [flag] if action.nargs == 0 else [flag, str(value)]
    if getattr(args, "verbose", False):
        argv.append("--verbose")
    return argv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(gpu_ids: list[str], run_argv: list[str], port: int | None = None) -> list[str]:
    return [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--include", "localhost:" + ",".join(gpu_ids),
        "--master_port", str(port or os.environ.get("MASTER_PORT") or free_port()),
        "--module", "virnuc_ds.run", *run_argv,
    ]


# ------------------------------------------------------------------------------------------------
# Running it
# ------------------------------------------------------------------------------------------------


def signal_ranks(launcher_pid: int, sig: int = signal.SIGTERM) -> int:
    """Send `sig` to the ranks under `launcher_pid` (the children of each deepspeed.launcher.launch
    process), not to the launchers themselves. Returns how many ranks were signalled."""
    import psutil  # noqa: PLC0415 - a DeepSpeed dependency

    count = 0
    try:
        procs = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            if LAUNCHER_MODULE not in " ".join(proc.cmdline()):
                continue
            for rank in proc.children():
                rank.send_signal(sig)
                count += 1
        except psutil.Error:
            continue
    return count


def run_launcher(cmd: list[str]) -> int:
    """Run the launcher command; forward SIGTERM/SIGINT to its ranks; return its exit code.

    The first signal asks the ranks to stop after the part in flight (exit 3). A second Ctrl-C stops
    everything at once; a repeated SIGTERM (schedulers and `kill` send several) changes nothing, as
    in a rank. A signal that comes before any rank has started stops the launcher at once (no part
    is in flight), with exit 3 too."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    signals_seen = []
    stopped_before_ranks = []

    def kill_all() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def forward(signum, _frame):
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            n = signal_ranks(proc.pid)
            if n == 0:  # still starting: nothing to finish, and a lost signal would let the run go on
                stopped_before_ranks.append(signum)
                print(f"virnuc-ds: {signal.Signals(signum).name} before any rank started: stopped "
                      "(exit code 3; rerun to resume)", file=sys.stderr)
                kill_all()
                return
            print(f"virnuc-ds: {signal.Signals(signum).name}: {n} rank(s) stop after the part in flight "
                  "(exit code 3; rerun to resume); Ctrl-C again to stop at once", file=sys.stderr)
        elif signum == signal.SIGINT:
            kill_all()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()  # PEP 475: resumed after forward() runs
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped_before_ranks:
        return EXIT_INTERRUPTED
    return 128 - rc if rc < 0 else rc


def missing_bytecode_caches(package: str = "torch") -> bool:
    """True when Python writes no bytecode caches (PYTHONDONTWRITEBYTECODE) and `package` has none.

    Then every Python process compiles the package's modules again on import: the launcher's two and
    each rank. On the lent H200 node (whose image sets PYTHONDONTWRITEBYTECODE=1 and ships torch with
    no caches) `import deepspeed` took 5.4-6.4 s, and 2.2 s with caches
    (benchmarks/results/python_startup_h200/). Finds the package without importing it."""
    if not sys.flags.dont_write_bytecode:
        return False
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    return not os.path.exists(importlib.util.cache_from_source(spec.origin))


BYTECODE_HINT = (
    "Python writes no bytecode caches here (PYTHONDONTWRITEBYTECODE is set) and torch has none, so each "
    "launcher process and rank compiles torch again at start-up (3-4 s each on an H200 node). Once per "
    "environment: `python -m compileall -q <site-packages>`, or set PYTHONPYCACHEPREFIX to a writable "
    "folder and unset PYTHONDONTWRITEBYTECODE (README, Troubleshooting)."
)


def maybe_relaunch(args, argv: list[str] | None = None) -> int | None:
    """Run under the DeepSpeed launcher when several GPUs are asked for or visible.

    Returns the launcher's exit code, or None when the run should go on in this process (no GPU or
    one GPU, --cpu, or already one rank of a launcher). `argv` is the run's own command line (the
    arguments after `run`); when None it is rebuilt from `args`. `--gpus` is never passed on.
    """
    spec = getattr(args, "gpus", None)
    if under_launcher():
        return None
    if getattr(args, "cpu", False):
        if spec is not None:
            raise VirnucError("--gpus and --cpu exclude each other")
        return None
    ids = select_gpus(spec)
    if len(ids) <= 1:
        return None
    run_argv = strip_gpus(list(argv)) if argv is not None else run_argv_from_args(args)
    cmd = launcher_command(ids, run_argv)
    log.info("starting %d ranks on GPUs %s: %s", len(ids), ",".join(ids), " ".join(cmd))
    return run_launcher(cmd)


# ------------------------------------------------------------------------------------------------
# virnuc-ds build-ops
# ------------------------------------------------------------------------------------------------


def cmd_build_ops(args) -> int:
    """Build (or load) DeepSpeed's transformer_inference op once, before the ranks start."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        print("virnuc-ds build-ops: no CUDA GPU visible; nothing to build (the CPU path needs no op)")
        return 0
    from .embed.esm2_kernels import prebuild_inference_op  # noqa: PLC0415

    prebuild_inference_op(verbose=args.verbose)
    print("virnuc-ds build-ops: DeepSpeed transformer_inference op is built and loads")
    return 0


# ------------------------------------------------------------------------------------------------
# virnuc-ds predict: the VirNucPro refactor's flags on top of run
# ------------------------------------------------------------------------------------------------


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input_file", nargs="?", help="nucleotide FASTA (.gz accepted); or -i")
    p.add_argument("-i", "--input", help="nucleotide FASTA (same as the positional INPUT_FILE)")
    p.add_argument("-m", "--model-type", choices=("300", "500", "custom"), default="500",
                   help="chunk length of the classifier: 300, 500 (default) or custom (needs -p, and -e for 300)")
    p.add_argument("-p", "--model-path", help="classifier checkpoint (default: models.classifier of the config, "
                   "else ./300_model.pth or ./500_model.pth)")
    p.add_argument("-e", "--expected-length", type=int, choices=(300, 500), help="chunk length (default: from -m)")
    p.add_argument("-o", "--output-dir", help="output folder (default: {input name}_predictions)")
    p.add_argument("-c", "--config", help="run config, YAML or JSON (see ds_configs/virnuc_ds.yaml)")
    p.add_argument("-d", "--device", default="auto",
                   help="auto (all visible GPUs, else CPU), cpu, cuda, cuda:N or N (default: auto)")
    p.add_argument("--gpus", help="comma-separated GPU ids, e.g. 0,1,2,3: one rank per GPU under the DeepSpeed launcher")
    p.add_argument("--esm-batch-size", type=batch_tokens, help="ESM-2 tokens per batch (esm2.toks_per_batch); lower it on out-of-memory")
    p.add_argument("--dnabert-batch-size", type=batch_tokens, help="DNABERT-S tokens per batch (dnabert_s.toks_per_batch)")
    p.add_argument("--resume", action="store_true",
                   help="resume from the finished parts in the output folder; this is always done, the flag is accepted for scripts")
    p.add_argument("-f", "--force", action="store_true", help="discard the output folder's earlier results and start over")
    p.add_argument("--no-progress", action="store_true", help="plain progress log lines instead of the live view")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only")
    compat = p.add_argument_group("accepted for scripts written for the VirNucPro refactor; no effect here")
    compat.add_argument("-b", "--batch-size", type=int, help="(the classifier runs on each finished part's frames; batching does not change its results)")
    compat.add_argument("-w", "--num-workers", type=int, help="(no data-loader workers)")
    compat.add_argument("-t", "--threads", type=int, help="(prepare uses prepare.workers of the config: all cores by default)")
    compat.add_argument("-k", "--keep-intermediate", action="store_true", help="(intermediate files are always kept: they are what a rerun resumes from)")
    compat.add_argument("--parallel", action="store_true", help="(all visible GPUs are used by default)")


def predict_run_argv(args) -> tuple[list[str], str | None]:
    """(run arguments, gpus spec) for a parsed `predict` command line."""
    from .config import load_config  # noqa: PLC0415

    if args.input_file and args.input and args.input_file != args.input:
        raise VirnucError(f"two inputs given: {args.input_file} and -i {args.input}")
    input_path = args.input or args.input_file
    if not input_path:
        raise VirnucError("predict needs an input FASTA: virnuc-ds predict sample.fa -o OUT (or -i sample.fa)")
    if args.resume and args.force:
        raise VirnucError("--resume and --force exclude each other")
    length = args.expected_length or (300 if args.model_type == "300" else 500)
    if args.model_type in ("300", "500") and args.expected_length and args.expected_length != int(args.model_type):
        raise VirnucError(f"-m {args.model_type} and -e {args.expected_length} disagree; the classifier needs the chunk length it was trained on")
    classifier = args.model_path
    if args.model_type == "custom" and not classifier:
        raise VirnucError("-m custom needs the classifier: -p my_model.pth")
    if not classifier and not load_config(args.config).models.classifier:
        default = Path(f"{length}_model.pth")
        if not default.is_file():
            raise VirnucError(f"predict needs the classifier: -p {length}_model.pth (or models.classifier in the config); "
                              f"no {default} in {Path.cwd()}")
        classifier = str(default)
    output_dir = args.output_dir or f"{Path(input_path).stem}_predictions"  # the refactor's default
    argv = ["-i", input_path, "-m", str(length), "-o", output_dir]
    if args.config:
        argv += ["-c", args.config]
    if classifier:
        argv += ["-p", classifier]
    if args.esm_batch_size:
        argv += ["--esm-batch-tokens", str(args.esm_batch_size)]
    if args.dnabert_batch_size:
        argv += ["--dnabert-batch-tokens", str(args.dnabert_batch_size)]
    if args.force:
        argv.append("--force")

    gpus = args.gpus
    device = (args.device or "auto").strip().lower()
    if device == "cpu":
        if gpus:
            raise VirnucError("--gpus and -d cpu exclude each other")
        argv.append("--cpu")
    elif device.removeprefix("cuda:").isdigit():
        if gpus:
            raise VirnucError(f"--gpus and -d {args.device} exclude each other")
        gpus = device.removeprefix("cuda:")
    elif device not in ("auto", "cuda"):
        raise VirnucError(f"-d {args.device}: expected auto, cpu, cuda, cuda:N or N")
    elif device == "cuda" and not gpus and not visible_gpu_ids():
        raise VirnucError("-d cuda: no CUDA GPU is visible on this machine (-d auto runs on the CPU then)")
    for flag, value in (("--batch-size", args.batch_size), ("--num-workers", args.num_workers), ("--threads", args.threads)):
        if value is not None:
            log.warning("%s is accepted for compatibility and has no effect here", flag)
    return argv, gpus


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set, as it was afterwards (the launcher's ranks inherit it meanwhile)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cmd_predict(args) -> int:
    from .cli import QUIET_ENV, configure_logging  # noqa: PLC0415

    argv, gpus = predict_run_argv(args)
    verbose = getattr(args, "verbose", False)
    settings = {}  # read in every rank (and prepare's process), so passed through the environment
    if args.no_progress:
        settings["VIRNUC_DS_PROGRESS"] = "plain"
    if args.quiet:
        settings[QUIET_ENV] = "1"
    try:
        with environment(settings):  # this command's only: an in-process caller's next command is unchanged
            configure_logging(verbose)
            return _predict(argv, gpus, verbose)
    finally:
        configure_logging(verbose)  # the caller's level again, from the restored environment


def _predict(argv: list[str], gpus: str | None, verbose: bool) -> int:
    from .run import add_run_arguments, run  # noqa: PLC0415

    parser = ArgumentParser(prog="virnuc-ds predict")
    add_run_arguments(parser)
    run_args = parser.parse_args(argv)
    run_args.gpus = gpus
    run_args.verbose = verbose
    log.info("predict: same as `virnuc-ds run %s%s`", " ".join(argv), f" --gpus {gpus}" if gpus else "")
    code = maybe_relaunch(run_args, argv + (["--verbose"] if verbose else []))
    if code is None:
        code = run(run_args)
    return code
