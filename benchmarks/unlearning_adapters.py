"""Which per-cluster adapter: peft LoRA against the paper's pad prompt (and a head alone), on one task.

For each adapter (a list of config overrides, e.g. `finetune=pad_prompt,finetune.pad=2`): fit the
per-cluster model of an unlearn experiment (default `unlearn_digits`), then forget each deletion set
of `dsire.unlearning.evaluation.deletion_sets` for `--fractions` (random examples and whole
classes), and record test accuracy, the trainable parameters per cluster and the fit's CPU seconds
(CPU rather than wall-clock: other jobs share the cores). Accuracies are deterministic.

    python -m benchmarks.unlearning_adapters [--experiment unlearn_digits] [--fractions 0.5]
        [--adapters "" finetune=pad_prompt,finetune.pad=1 ...]
"""

from __future__ import annotations

import argparse

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from benchmarks.report import command_line, write_section
from dsire.project import ROOT
from dsire.unlearn import fit_inputs
from dsire.unlearning.adapters import deterministic, fit, forget, predict_logits
from dsire.unlearning.evaluation import EvaluationSettings, accuracy_of, deletion_sets, timed

PAD_2 = "finetune=pad_prompt,finetune.pad=2"
ADAPTERS = [
    "",
    "finetune=pad_prompt,finetune.pad=1",
    PAD_2,
    "finetune=head_only",
    *(f"{m},finetune.lr={lr}" for lr in (0.03, 0.3) for m in (PAD_2, "finetune=head_only")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="unlearn_digits")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5])
    parser.add_argument("--adapters", nargs="+", default=ADAPTERS, help="comma-separated overrides ('' = as is)")
    args = parser.parse_args()
    settings = EvaluationSettings(fractions=tuple(args.fractions))
    rows, kinds = [], []
    for adapter in args.adapters:
        overrides = [f"+experiment={args.experiment}", f"paths.root_dir={ROOT}", *filter(None, adapter.split(","))]
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("unlearn", overrides=overrides)
        label, parameters, cpu, kinds, accuracies = measure(cfg, settings)
        cells = " | ".join(f"{a:.3f}" for a in accuracies)
        rows.append(f"| {label} | {cfg.finetune.lr:g} | {parameters:,} | {cpu:.1f} | {cells} |")
        print(rows[-1], flush=True)
    header = " | ".join(["nothing forgotten", *kinds])
    write_section(
        f"unlearning_adapters_{args.experiment}",
        f"""
## Exact unlearning: LoRA against the paper's pad prompt

`{command_line()}` (`{args.experiment}`): the per-cluster model with each adapter (its own head in
every case; `head_only`: the head alone; one SGD learning rate for adapter and head). Test accuracy
before and after one forget request removing the listed fraction of the private split (random
examples; whole classes); parameters trained per cluster; CPU seconds of the fit (all clusters, one
thread, the cores shared with other jobs). Accuracies are deterministic.

| adapter | lr | parameters per cluster | fit CPU s | {header} |
| --- | ---: | ---: | ---: | {" | ".join(["---:"] * (1 + len(kinds)))} |
{chr(10).join(rows)}
""",
    )


def measure(cfg: DictConfig, settings: EvaluationSettings) -> tuple[str, int, float, list[str], list[float]]:
    """(adapter label, parameters per cluster, fit CPU seconds, deletion names, accuracy before and
    after each deletion) of the per-cluster model of `cfg`."""
    lab, clustering, recipe = fit_inputs(cfg)
    with deterministic():
        model, (_, cpu) = timed(lambda: fit(lab, clustering, recipe))
        accuracies = [accuracy_of(predict_logits(model, lab, lab.task.test), lab)]
        sets = deletion_sets(lab, settings)
        for _, chosen in sets:
            result = forget(model, lab, clustering, chosen)
            accuracies.append(accuracy_of(predict_logits(result.model, lab, lab.task.test), lab))
    kinds = [f"{kind} {len(chosen) / len(lab.task.private):.2f}" for kind, chosen in sets]
    return lab.finetune.label, model.adapter_parameters(model.alive[0]), cpu, kinds, accuracies


if __name__ == "__main__":
    main()
