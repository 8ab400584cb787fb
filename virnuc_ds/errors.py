"""Errors the command line turns into one-line messages and exit codes.

Exit codes: 0 success, 1 failure (bad input, missing file, bad config), 2 partial or incomplete
result (some frames failed or are missing; what is missing is named).
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_PARTIAL = 2
EXIT_INTERRUPTED = 3  # SIGTERM/SIGINT: finished work kept, rerun resumes


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
