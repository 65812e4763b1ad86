"""User mistakes as one line: `error: <file or config key>: <problem and what is allowed>`, exit 2.

Code that validates input raises `UserError(where, problem)` (settings classes do it through
`dsire.settings`); entry points (train.py, predict.py, audit.py) wrap their job in
`report_user_errors`, so a user sees one line and never a traceback. A few library errors are user
mistakes too and are reported the same way: a bad LoRA or labels file (`LoRAError`), a missing
`???` config value, an OS error on a named file, and any of these raised inside Hydra's
`instantiate`. Bugs still raise normally.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from dsire.lora.model import LoRAError

P = ParamSpec("P")
R = TypeVar("R")
EXIT_CODE = 2


class UserError(Exception):
    """A mistake in a config value or an input file, named by `where` (a config key or a path)."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


def user_error(exc: BaseException) -> str | None:
    """The one-line message for a user mistake (looking inside Hydra's instantiation errors); None for a bug."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, UserError | LoRAError):
        return str(exc)
    if isinstance(exc, MissingMandatoryValue):
        return f"{exc.full_key}: missing; give it on the command line ({exc.full_key}=...)"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


def report_user_errors(job: Callable[P, R]) -> Callable[P, R]:
    """Run `job`; a user mistake (see `user_error`) becomes one `error:` line on stderr and exit code 2."""

    @functools.wraps(job)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return job(*args, **kwargs)
        except Exception as exc:
            message = user_error(exc)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_CODE)

    return wrapper
