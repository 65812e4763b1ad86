"""User mistakes as one line: `error: <file or config key>: <problem and what is allowed>`, exit 2.

Code that validates input raises `UserError(where, problem)`; entry points wrap their job in
`report_user_errors`, so a user sees one line and never a traceback. Bugs still raise normally.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class UserError(Exception):
    """A mistake in a config value or an input file, named by `where` (a config key or a path)."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


def report_user_errors(job: Callable[P, R]) -> Callable[P, R]:
    """Run `job`; a `UserError` becomes one `error:` line on stderr and exit code 2."""

    @functools.wraps(job)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return job(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper
