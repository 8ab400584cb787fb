"""Errors the command line turns into one-line messages and exit codes.

Exit codes: 0 success, 1 failure (bad input, missing file, bad config, bad command line), 2 partial
or incomplete result (some frames failed or are missing; what is missing is named), 3 stopped by a
signal.
"""

import argparse
import signal
import sys

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_PARTIAL = 2
EXIT_INTERRUPTED = 3  # SIGTERM/SIGINT: finished work kept, rerun resumes


def ignore_interrupts() -> None:
    """In a helper process of a rank (prepare, the background merge): a terminal's Ctrl-C reaches
    every process of the foreground group, and the rank alone decides what it means (stop after the
    part in flight, or now). The helper's own pool inherits it: an ignored signal stays ignored in a
    spawned interpreter."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def exit_on_sigterm() -> None:
    """In a helper process its rank stops with SIGTERM (the background merge): leave through Python's
    exception path, so its `finally` blocks remove its temporary files, instead of dying on the spot."""
    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


def ignore_signals_once_decided() -> None:
    """A program whose outcome is decided (its exit code is known, every output in place): a repeated
    SIGTERM or Ctrl-C during the interpreter's ~1 s of teardown would turn exit 3 (or 0) into 143
    (or 130). Called by the entry points only, never by a library caller."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def first_line(error: BaseException) -> str:
    """An exception as one short line: its type, and the first line of its message if it has one
    (library errors can run to dozens of lines: a state_dict's every mismatched key)."""
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else ""
    if len(line) > 300:
        line = line[:297] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError, or another error saying so (a cuBLAS or cuDNN allocation)."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


class VirnucError(Exception):
    """An error the user can act on; its message is printed as one line."""

    exit_code = EXIT_FAILURE


class InputError(VirnucError):
    """Bad input file: the message names the file, the record and the reason."""

    def __init__(self, path, reason, record=None):
        where = f"{path}" if record is None else f"{path}: record {record!r}"
        super().__init__(f"{where}: {reason}")
        self.path, self.record, self.reason = str(path), record, reason

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.reason, self.record))


class ConfigError(VirnucError):
    """Bad configuration: unknown key, wrong type, impossible value."""


class ModelNotFoundError(VirnucError):
    """A model file or folder is missing; the message lists where it was looked for."""

    def __init__(self, what, searched):
        places = ", ".join(str(p) for p in searched)
        super().__init__(f"{what} not found; looked in: {places}")
        self.what, self.searched = what, [str(p) for p in searched]

    def __reduce__(self):
        return (type(self), (self.what, self.searched))


class IncompleteError(VirnucError):
    """Outputs are incomplete (missing, duplicated or non-finite frames)."""

    exit_code = EXIT_PARTIAL


class InterruptedRun(VirnucError):
    """The run was stopped by a signal; finished parts are kept and a rerun resumes."""

    exit_code = EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors exiting 1, like any other bad input: argparse's own 2 would read
    as "incomplete result" to a script that checks the exit code."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_FAILURE, f"{self.prog}: error: {message}\n")


def batch_tokens(text: str) -> int:
    """argparse type of the token-budget flags: the config's rule (at least 1024)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"must be at least 1024, got {value}")
    return value
