"""The cost of one forget request against retraining, SISA and full fine-tuning, in one run.

Fits the per-cluster model of an unlearn experiment (default `unlearn_wide`: a 2.18 M-parameter
backbone, 30 public clusters), then times single-example forget requests against retraining the
whole private stage, SISA's shard, the global adapter and full fine-tuning
(`dsire.unlearning.evaluation.request_costs`). Every ratio compares seconds measured in the same
run; the machine's load average is printed with the table, since other jobs share the cores.

    python -m benchmarks.unlearning_costs [--experiment unlearn_wide] [--clusters 30] [--requests 3]
"""

from __future__ import annotations

import argparse
import os

from hydra import compose, initialize_config_dir

from benchmarks.report import command_line, write_section
from dsire.project import ROOT
from dsire.unlearn import fit_inputs
from dsire.unlearning.adapters import deterministic, fit, predict_logits
from dsire.unlearning.evaluation import COSTED, Baselines, EvaluationSettings, accuracy_of, logits_of, request_costs

HEADER = (
    "| one forget request | parameters retrained | × fewer than full fine-tuning | seconds | CPU seconds "
    "| × the per-cluster seconds | examples reprocessed |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
)
NAMES = {
    "per_cluster": "per-cluster adapters (one cluster)",
    "sisa": "SISA (one hash shard)",
    "retrain_private_stage": "retrain the private stage (every cluster)",
    "global_adapter": "global adapter (retrain)",
    "full_finetune": "full fine-tuning (retrain)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="unlearn_wide")
    parser.add_argument("--clusters", type=int, help="override unlearning.clustering.n_clusters")
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args()
    overrides = [f"+experiment={args.experiment}", f"paths.root_dir={ROOT}", "paths.output_dir=."]
    if args.clusters is not None:
        overrides.append(f"unlearning.clustering.n_clusters={args.clusters}")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("unlearn", overrides=overrides)
    load_before = os.getloadavg()
    lab, clustering, recipe = fit_inputs(cfg)
    index = {e: i for i, e in enumerate(lab.task.private.ids)}
    with deterministic():
        model = fit(lab, clustering, recipe)
        baselines = Baselines(lab, index, len(model.prototypes))
        costs = request_costs(lab, model, clustering, baselines, EvaluationSettings(requests=args.requests))
        accuracy = {
            "per-cluster adapters": accuracy_of(predict_logits(model, lab, lab.task.test), lab),
            "global adapter": accuracy_of(logits_of(baselines.global_adapter(set()), lab), lab),
            "public backbone": accuracy_of(logits_of(lab.backbone, lab), lab),
        }
    load_after = os.getloadavg()
    sizes = sorted(len(m) for m in model.members.values())
    ours, full = costs["per_cluster"], costs["full_finetune"]
    rows = [
        f"| {NAMES[name]} | {costs[name]['parameters_retrained']:,.0f} "
        f"| {full['parameters_retrained'] / costs[name]['parameters_retrained']:.1f}× "
        f"| {costs[name]['seconds']:.2f} | {costs[name]['cpu_seconds']:.2f} "
        f"| {costs[name]['seconds'] / ours['seconds']:.1f}× | {costs[name]['examples_reprocessed']:,.0f} |"
        for name in COSTED
    ]
    backbone = sum(p.numel() for p in lab.backbone.parameters())
    text = f"""
## Exact unlearning: the cost of one forget request

`{command_line()}` (`{args.experiment}`: {backbone:,} backbone parameters, {len(model.prototypes)} public
clusters, {len(model.alive)} with private members, {sizes[0]}–{sizes[-1]} each, of {len(lab.task.private)});
median of {args.requests} single-example requests; the whole-stage retrain, the global adapter and full
fine-tuning once. Every time in this table comes from the same run, on 2 CPU cores shared with other
jobs: load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end.

{HEADER}
{chr(10).join(rows)}

Test accuracy before any deletion: {", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())}.
"""
    print(text, flush=True)
    write_section("unlearning_costs", text)


if __name__ == "__main__":
    main()
