"""User mistakes end in one line, `error: <config key or file>: <problem and what is allowed>`, exit code 2.

Code raises `ConfigError(key, problem)` for a bad config value (usually from a config dataclass's
`__post_init__`) and `LoRAError(file, problem)` for a bad file. Hydra entry points (train.py,
predict.py, audit.py, ...) wrap their task function in `exit_on_user_error`, which turns those, and
the few library errors that are user mistakes too (a missing `???` value, an OS error on a named
file), into that one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from dsire.lora.model import LoRAError

EXIT_CODE = 2
T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `ConfigError` naming `key`, `value` and `allowed` unless `ok`."""
    if not ok:
        raise ConfigError(key, f"{value!r} is not allowed; {allowed}")


def is_int(value: Any) -> bool:
    """A whole number given as an int (not a bool, a float or a string)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def require_device(key: str, device: str) -> None:
    """Refuse a CUDA device (or Lightning's `gpu` accelerator) on a machine without one, before any work."""
    if str(device).split(":")[0] in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(key, f"{device!r}, but this machine has no CUDA device; use cpu")


def user_error(exc: BaseException) -> str | None:
    """The one-line message for a user mistake (looking inside Hydra's instantiation errors); None for a bug."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, ConfigError | LoRAError):
        return str(exc)
    if isinstance(exc, MissingMandatoryValue):
        return f"{exc.full_key}: missing; give it on the command line ({exc.full_key}=...)"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


def exit_on_user_error(task: Callable[..., T]) -> Callable[..., T]:
    """Decorate a Hydra task: a user mistake prints `error: ...` on stderr and exits 2, without a traceback."""

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return task(*args, **kwargs)
        except Exception as exc:
            message = user_error(exc)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_CODE)

    return run
