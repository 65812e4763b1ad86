"""Every fixed configuration of a selection grid, scored by the outer concept CV train.py uses.

    python -m benchmarks.select_grid --zoo data/zoo [--grid auto] [--folds 5]

The zoo (a manifest directory, or a LoRA-WiSE parquet file named after its subset) is featurised once
(every part, all singular values); each configuration of configs/model/select/<grid>.yaml is then
scored by `folds`-fold concept CV, the same folds as `train.py data.split.folds=<folds>` (seed 0), with
the same neighbour search and vote as model selection uses. Prints the defaults (the paper's voters)
and the best fixed configuration, vote accuracy and MAE with the std of MAE over folds, and writes
every configuration's scores to `--out` (CSV; default: select_grid_<grid>.csv beside the zoo). `auto`
itself is train.py's result (nested: its choice is made inside each split).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from benchmarks.report import command_line
from dsire.atomic import atomic_write_csv
from dsire.featurise import zoo_features
from dsire.models.features import Features
from dsire.models.select import Candidate, SelectConfig, select
from dsire.project import ROOT


def featurise(zoo: Path) -> Features:
    """Every part of every layer of a manifest zoo, or of a LoRA-WiSE parquet file."""
    kind = "lorawise" if zoo.suffix == ".parquet" else "manifest"
    return zoo_features({"kind": kind, "path": str(zoo)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--grid", default="auto")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    grid = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / "select" / f"{args.grid}.yaml"))
    grid = {k: v for k, v in grid.items() if k != "defaults"} | {"folds": args.folds, "points": 10**9}
    features = featurise(args.zoo)
    scores = select(features, Candidate(), SelectConfig(**grid)).scores
    rows = [
        s["candidate"] | {k: s[k] for k in ("mae", "accuracy")} | {"mae_std": np.std(s["fold_mae"])} for s in scores
    ]
    best = min(rows, key=lambda r: (r["mae"], -r["accuracy"]))
    for name, row in (("defaults", rows[0]), ("best fixed", best)):
        print(f"{name}: accuracy {row['accuracy']:.3f}, MAE {row['mae']:.3f} ± {row['mae_std']:.3f}; {row}")
    out = args.out or (args.zoo if args.zoo.is_dir() else args.zoo.parent) / f"select_grid_{args.grid}.csv"
    atomic_write_csv(out, list(rows[0]), rows)
    print(f"{command_line()}: {len(rows)} configurations -> {out}")


if __name__ == "__main__":
    main()
