"""What a sweep must train: its jobs (concept, N, replicate, seed) and the hash of its recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dsire.zoo.pretrain import config_hash
from dsire.zoo.seeds import model_seed

# Where things are and which jobs a sweep plans are not part of the recipe: a LoRA trained from the same
# base (fingerprinted separately), data, LoRA and training settings has the same recipe hash on any machine.
NOT_RECIPE = {"name", "out_dir", "sizes", "replicates", "base.path", "data.root", "data.concepts", "data.count"}


@dataclass(frozen=True)
class Job:
    concept: str
    n: int
    replicate: int
    seed: int

    def filename(self, step: int, fmt: str) -> str:
        suffix = "" if fmt == "peft" else ".safetensors"
        return f"{self.concept}_n{self.n}_r{self.replicate}_step{step}{suffix}"


def recipe_hash(cfg: DictConfig) -> str:
    """Hash of how each LoRA is trained, independent of paths and of the sweep's plan."""
    recipe = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_RECIPE:
        *parents, leaf = key.split(".")
        node = recipe
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return config_hash(OmegaConf.create(recipe))


def plan(cfg: DictConfig, concepts: list[str]) -> list[Job]:
    """All jobs, ordered by concept then N; seeds come from the policy, which never sees N."""
    return [
        Job(concept, n, rep, model_seed(cfg.seeds.policy, cfg.seeds.zoo_seed))
        for concept in concepts
        for n in cfg.sizes
        for rep in range(cfg.replicates)
    ]


def finished(job: Job, rows: list[dict[str, str]], cfg: DictConfig, out_dir: Path) -> bool:
    recorded = {row["path"] for row in rows}
    names = [job.filename(step, cfg.format) for step in cfg.train.snapshot_steps]
    return all(name in recorded and (out_dir / name).exists() for name in names)
