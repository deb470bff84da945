"""The base of every error that means "the user asked for something that cannot work".

Command-line programs (`train.main`, the evaluators' `runtime.cli_main`, the sweep) catch `UserError`
and print its message as one line; any other exception, including JAX's and NumPy's own
ValueErrors, is a bug or an environment problem and keeps its traceback. Each module raises its
own subclass (DataError, CheckpointError, ShardingError, ...), so a caller can tell them apart;
`ConfigError` is for a flag or config value that is invalid on its own.

`UserError` is a ValueError, so code that caught ValueError around these calls keeps working.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator


class UserError(ValueError):
    """Bad input (a flag, a file, a checkpoint): the message says what is wrong and what is expected."""


class ConfigError(UserError):
    """A flag or config value that cannot work (unknown name, out of range, contradicting another)."""


@contextlib.contextmanager
def exit_on_user_error(status: int = 2) -> Iterator[None]:
    """For a command's `main`: a UserError raised inside is printed as one line, `error: MESSAGE`, on
    stderr and exits with `status`; every other exception passes through with its traceback."""
    try:
        yield
    except UserError as e:
        logging.debug("user error", exc_info=True)  # --verbosity=1 shows where it was raised
        sys.stderr.write(f"error: {e}\n")
        sys.exit(status)
