"""Seed policy. A LoRA's seed is never a function of N.

A seed tied to N gives every LoRA of one size class the same A-initialisation; nearest-neighbour
retrieval then matches the init, not the data. `fixed` (the default, as common training scripts do)
gives every model of the zoo one seed, so all share one A-init and one noise sequence and differ by
their data only. `per_model` draws an independent random seed for each model from the operating
system's entropy; the manifest and each file's metadata record it, which is what reproduces a model.
`model_seed` takes nothing about the model, so no policy can depend on N.
"""

from __future__ import annotations

import secrets

from dsire.errors import UserError

POLICIES = ("fixed", "per_model")


def model_seed(policy: str, zoo_seed: int) -> int:
    if policy == "fixed":
        return zoo_seed
    if policy == "per_model":
        return secrets.randbits(31)
    raise UserError("zoo.seeds.policy", f"{policy!r} is not one of {', '.join(POLICIES)}")
