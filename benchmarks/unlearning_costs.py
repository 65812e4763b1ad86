"""The cost of one forget request against the number of clusters, on the digits task.

For each number of public clusters: fit the per-cluster model (`unlearn_digits`), then time
single-example forget requests against retraining the whole private stage, SISA's shard, the
global adapter and full fine-tuning (`dsire.unlearning.evaluation.request_costs`). The machine's
load average is printed with the table: the seconds are only comparable on an idle machine.

    python -m benchmarks.unlearning_costs [--clusters 10 20 30] [--requests 5]
"""

from __future__ import annotations

import argparse
import os

from hydra import compose, initialize_config_dir

from benchmarks.report import command_line, write_section
from dsire.lab.build import build_lab
from dsire.project import ROOT
from dsire.unlearning.adapters import deterministic, fit, predict_logits
from dsire.unlearning.clusters import ClusterSettings
from dsire.unlearning.evaluation import Baselines, EvaluationSettings, accuracy_of, request_costs

HEADER = (
    "| clusters | with members (sizes) | test acc | forget (s) | retrain all clusters (s) | ratio | SISA shard (s) "
    "| global adapter (s) | full fine-tune (s) | examples reprocessed |\n"
    "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "unlearn", overrides=["+experiment=unlearn_digits", f"paths.root_dir={ROOT}", "paths.output_dir=."]
        )
    lab = build_lab(cfg)
    index = {e: i for i, e in enumerate(lab.task.private.ids)}
    rows = []
    for clusters in args.clusters:
        clustering = ClusterSettings(n_clusters=clusters)
        with deterministic():
            model = fit(lab, clustering, {"unlearning": {"clustering": {"n_clusters": clusters}}})
            costs = request_costs(
                lab, model, clustering, Baselines(lab, index, clusters), EvaluationSettings(requests=args.requests)
            )
        ours, stage = costs["per_cluster"], costs["retrain_private_stage"]
        accuracy = accuracy_of(predict_logits(model, lab, lab.task.test), lab)
        sizes = sorted(len(m) for m in model.members.values())
        rows.append(
            f"| {clusters} | {len(model.alive)} ({sizes[0]}–{sizes[-1]}) | {accuracy:.3f} | "
            f"{ours['seconds']:.2f} | {stage['seconds']:.2f} | {stage['seconds'] / ours['seconds']:.1f}× | "
            f"{costs['sisa']['seconds']:.2f} | {costs['global_adapter']['seconds']:.2f} | "
            f"{costs['full_finetune']['seconds']:.2f} | {ours['examples_reprocessed']:.0f} |"
        )
        print(rows[-1], flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    write_section(
        "unlearning_costs",
        f"""
## Exact unlearning: the cost of one forget request against the number of clusters

`{command_line()}`: digits, `unlearn_digits` recipe (LoRA r=8 on fc1, fc2 + a head per cluster, 300
steps), public prototypes; median wall-clock seconds of {args.requests} single-example requests; the
whole-stage retrain, global adapter and full fine-tune once. Load average at the end: {load} (2 cores).

{HEADER}
{chr(10).join(rows)}
""",
    )


if __name__ == "__main__":
    main()
