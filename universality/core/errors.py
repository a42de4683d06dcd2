"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class UnivError(Exception):
    """A problem with the user's input or environment, not a bug: shown without a traceback."""


class ConfigError(UnivError):
    """An invalid configuration value, preset or config file."""


class DataError(UnivError):
    """An unusable corpus, activation file or other input data."""


class TrainingDiverged(UnivError):
    """A training loss became NaN or infinite."""


def from_os_error(exc: OSError) -> UnivError:
    """A file-system failure (full disk, unwritable, missing or misplaced file) as one line naming the path."""
    where = f": {exc.filename}" if exc.filename else ""
    return UnivError(f"file system error, {exc.strerror or exc}{where}")


def first_line(exc: Exception) -> str:
    """An exception's message on one line (MLflow's can span several, with hints after the first)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
