"""Typed settings from Hydra configs: each value checked when built, each mistake named by its key.

A settings class is a frozen dataclass whose `__post_init__` raises `UserError(field, problem)`
for values out of range; `from_config` adds the config path (`finetune.rank`), rejects unknown
keys and checks every value's type against the field's annotation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from dsire.errors import UserError

T = TypeVar("T")


def from_config(cls: type[T], cfg: DictConfig | Mapping | None, prefix: str) -> T:
    """`cls(**cfg)` with unknown keys, wrong types and invalid values reported as `prefix.key`."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise UserError(f"{prefix}.{key}", f"unknown setting; allowed: {', '.join(fields)}")
    converted = {key: _convert(value, hints[key], f"{prefix}.{key}") for key, value in values.items()}
    try:
        return cls(**converted)
    except UserError as exc:
        raise UserError(f"{prefix}.{exc.where}", exc.problem) from None


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` as the annotated type (lists become tuples), or a `UserError` saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _convert(value, option, where)
            except UserError:
                continue
        raise UserError(where, f"{value!r} is not {' or '.join(_name(o) for o in options)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(where, f"{value!r} is not a list")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(where, f"{value!r} is not a mapping")
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if typing.get_origin(hint) is typing.Literal:
        if value in args:
            return value
        raise UserError(where, f"{value!r} is not one of {', '.join(map(str, args))}")
    raise UserError(where, f"{value!r} is not {_name(hint)}")


def _name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def require(condition: bool, field: str, problem: str) -> None:
    """For `__post_init__`: raise `UserError(field, problem)` unless `condition`."""
    if not condition:
        raise UserError(field, problem)


def require_device(where: str, device: str) -> None:
    """Refuse a CUDA device (or Lightning's `gpu` accelerator) on a machine without one, before any work."""
    if str(device).split(":")[0] in ("cuda", "gpu"):
        import torch  # only when a GPU is asked for

        require(torch.cuda.is_available(), where, f"{device!r}, but this machine has no CUDA device; use cpu")
