"""Seed policy. Seeds are never a function of N.

A seed tied to N gives every LoRA of one size class the same A-initialisation; nearest-neighbour
retrieval then matches the init, not the data. `fixed` (the default, as common training scripts
do) gives every model of the zoo one init seed; `per_model` gives each model its own seed drawn
from a hash of (zoo seed, concept, replicate, N): independent across models, so no size class
shares an init.
"""

from __future__ import annotations

import hashlib

POLICIES = ("fixed", "per_model")


def model_seed(policy: str, zoo_seed: int, concept: str, replicate: int, n: int) -> int:
    if policy == "fixed":
        return zoo_seed
    if policy == "per_model":
        digest = hashlib.sha256(f"{zoo_seed}/{concept}/{replicate}/{n}".encode()).digest()
        return int.from_bytes(digest[:4], "little")
    raise ValueError(f"unknown seed policy {policy!r}; one of {POLICIES}")
