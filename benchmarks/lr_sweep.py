"""The learning-rate sweep behind the audit's `finetune.lr`: per method and rank, the in-sample loss
and test accuracy of two models (each on a random half of the private digits) at each rate.

`finetune.lr` is the weights' rate (LoRA's B scaled to match); the largest rate at which every
configuration trains is the audit's default. Writes the table to benchmarks/README.md.

    python -m benchmarks.lr_sweep [--lrs 0.003 0.01 0.03 0.1] [--steps 300]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from benchmarks.report import command_line, write_section
from dsire.lab.build import Lab, build_lab
from dsire.lab.ensemble import train
from dsire.lab.methods import FinetuneSettings, adapt
from dsire.lab.subsets import half_masks
from dsire.project import ROOT

CONFIGURATIONS = [("full", 8), ("lora_fa", 1), ("lora_fa", 8), ("lora_fa", 64), ("lora", 1), ("lora", 8), ("lora", 64)]
CONFIGURATIONS += [("head_only", 8)]


def cell(lab: Lab, method: str, rank: int, lr: float, steps: int) -> str:
    """'in-sample loss / test accuracy' of two models, or 'diverges'."""
    settings = FinetuneSettings(method=method, rank=rank, steps=steps, lr=lr)  # type: ignore[arg-type]
    masks = torch.as_tensor(half_masks(2, len(lab.task.private), seed=0))
    ensemble, _ = train([adapt(lab.backbone, settings, s) for s in (0, 1)], lab.task.private, masks, [0, 1], settings)
    logits = ensemble.logits(lab.task.private)
    if not torch.isfinite(logits).all():
        return "diverges"
    labels = lab.task.private.labels
    loss = torch.stack([F.cross_entropy(logits[m][masks[m]], labels[masks[m]]) for m in range(2)]).mean()
    accuracy = (ensemble.logits(lab.task.test).argmax(-1) == lab.task.test.labels).float().mean()
    return f"{loss:.3f} / {accuracy:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("audit", overrides=[f"paths.root_dir={ROOT}", "paths.output_dir=unused"])
    lab = build_lab(cfg)
    header = " | ".join(f"{m} r={r}" if m.startswith("lora") else m for m, r in CONFIGURATIONS)
    rows = []
    for lr in args.lrs:
        cells = [cell(lab, method, rank, lr, args.steps) for method, rank in CONFIGURATIONS]
        rows.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        print(rows[-1])
    write_section(
        "lr_sweep",
        f"""
## Learning rates of the privacy audit's fine-tunes

`{command_line()}`: digits task, pretrained backbone, {args.steps} SGD steps of batch 32 (momentum 0.9),
two models per cell each on a random half of the private split; in-sample loss / test accuracy.

| lr | {header} |
| --- | {" | ".join("---" for _ in CONFIGURATIONS)} |
{chr(10).join(rows)}
""",
    )


if __name__ == "__main__":
    main()
