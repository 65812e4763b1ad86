"""What a minimum cluster size buys and costs: accuracy after deletions, clusters and retraining.

For each `unlearning.clustering.min_size`: fit the per-cluster model of an unlearn experiment
(default `unlearn_digits`), then forget each deletion set of `dsire.unlearning.evaluation.deletion_sets`
(random examples and whole classes) and record test accuracy, the clusters retrained and removed,
and the examples reprocessed. No timing: every number is deterministic.

    python -m benchmarks.unlearning_min_size [--experiment unlearn_digits] [--min-sizes 1 10 20]
"""

from __future__ import annotations

import argparse
import dataclasses

from hydra import compose, initialize_config_dir

from benchmarks.report import command_line, write_section
from dsire.project import ROOT
from dsire.settings import from_config
from dsire.unlearn import fit_inputs
from dsire.unlearning.adapters import deterministic, fit, forget, predict_logits
from dsire.unlearning.evaluation import EvaluationSettings, accuracy_of, deletion_sets

HEADER = (
    "| min size | clusters with members (sizes) | deletion | examples | test accuracy | clusters retrained "
    "| clusters removed | examples reprocessed |\n| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="unlearn_digits")
    parser.add_argument("--min-sizes", type=int, nargs="+", default=[1, 10, 20])
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("unlearn", overrides=[f"+experiment={args.experiment}", f"paths.root_dir={ROOT}"])
    lab, base, recipe = fit_inputs(cfg)
    settings = from_config(EvaluationSettings, cfg.get("evaluation") or {}, "evaluation")
    rows = []
    for min_size in args.min_sizes:
        clustering = dataclasses.replace(base, min_size=min_size)
        recipe["unlearning"]["clustering"]["min_size"] = min_size
        with deterministic():
            model = fit(lab, clustering, recipe)
            sizes = sorted(len(m) for m in model.members.values())
            shape = f"{len(model.alive)} ({sizes[0]}–{sizes[-1]})"
            accuracy = accuracy_of(predict_logits(model, lab, lab.task.test), lab)
            rows.append(f"| {min_size} | {shape} | none | 0 | {accuracy:.3f} | | | |")
            for kind, chosen in deletion_sets(lab, settings):
                result = forget(model, lab, clustering, chosen)
                accuracy = accuracy_of(predict_logits(result.model, lab, lab.task.test), lab)
                rows.append(
                    f"| {min_size} | {len(result.model.alive)} | {kind} {len(chosen) / len(lab.task.private):.2f} "
                    f"| {len(chosen)} | {accuracy:.3f} | {len(result.retrained)} | {len(result.removed)} "
                    f"| {result.examples_reprocessed} |"
                )
                print(rows[-1], flush=True)
    write_section(
        "unlearning_min_size" if args.experiment == "unlearn_digits" else f"unlearning_min_size_{args.experiment}",
        f"""
## Exact unlearning: a minimum cluster size

`{command_line()}` (`{args.experiment}`, {len(lab.task.private)} private examples): a cluster with fewer
private members than the minimum is merged into the cluster of the nearest other public prototype,
at fit time and again after every forget (so a forget still equals a retrain bit for bit). Each
deletion is one forget request from the fitted model; accuracy on the test split. Deterministic.

{HEADER}
{chr(10).join(rows)}
""",
    )


if __name__ == "__main__":
    main()
