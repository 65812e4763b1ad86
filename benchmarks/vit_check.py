"""The lab's ViT-B/16 recipe end to end at toy scale: a membership audit (`audit.py`), an unlearnable
fit (`unlearn.py`), a forget request and the retrain it must equal, on timm's ViT-B/16 with random
weights and digits upscaled into an image folder (`benchmarks.vit_inputs`). It checks the code path
and measures time per step, not a real ViT's accuracy. Needs timm (`pip install -e '.[vit]'`).

    python -m benchmarks.vit_check                      # CPU: slow on 2 cores (figures in benchmarks/README.md)
    python -m benchmarks.vit_check --accelerator gpu    # the audit on CUDA (benchmarks/gpu_check.sh)

Figures go to `<out>/vit_check.md` and to the section `vit_<accelerator>` of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from benchmarks.report import command_line, write_section
from benchmarks.vit_inputs import WEIGHTS, make_inputs
from dsire.atomic import atomic_write_text
from dsire.errors import report_user_errors
from dsire.lab.build import build_lab
from dsire.lab.ensemble import Ensemble, train_ensemble
from dsire.lab.methods import adapt
from dsire.project import ROOT


def overrides(args: argparse.Namespace, inputs: Path) -> list[str]:
    """The task and fine-tune of every step: the recipe's image folder and weights, toy sizes."""
    return [
        "task=image_folder",
        f"task.path={inputs / 'images'}",
        f"task.backbone.weights={inputs / WEIGHTS}",
        f"task.private_limit={args.private}",
        f"task.pretrain.steps={args.steps}",
        "task.pretrain.batch_size=8",
        f"finetune.steps={args.steps}",
        f"finetune.batch_size={args.batch_size}",
        f"finetune.rank={args.rank}",
        "finetune.target_modules=[qkv]",
        f"paths.cache_dir={args.out / 'cache'}",
        "logger=csv",
    ]


def step_seconds(args: argparse.Namespace, common: list[str]) -> dict:
    """Pretraining (the backbone's head on the public split, then cached for the steps after), and
    seconds per training step of `ensemble` LoRA models and per inference pass over the private split."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("audit", overrides=[*common, f"lab.accelerator={args.accelerator}"])
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    cached = any((args.out / "cache" / "lab").glob("backbone_*.safetensors"))
    started = time.perf_counter()
    lab = build_lab(cfg, device)
    pretrain = time.perf_counter() - started
    models = [adapt(lab.backbone, lab.finetune, seed) for seed in range(args.ensemble)]
    ensemble = Ensemble.from_models(models)
    masks = torch.ones(args.ensemble, len(lab.task.private), dtype=torch.bool)
    started = _now(device)
    train_ensemble(ensemble, lab.task.private, masks, list(range(args.ensemble)), lab.finetune)
    training = (_now(device) - started) / lab.finetune.steps
    started = _now(device)
    ensemble.logits(lab.task.private)
    inference = _now(device) - started
    return {
        "pretrain_seconds": pretrain,
        "pretrain_cached": cached,
        "train_seconds_per_step": training,
        "images_per_step": args.ensemble * args.batch_size,
        "logits_seconds": inference,
        "logits_images": args.ensemble * len(lab.task.private),
    }


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run(name: str, script: str, arguments: list[str], out: Path) -> float:
    """`python SCRIPT ARGUMENTS` (hydra.run.dir=<out>/<name>), its log in <out>/<name>.log; wall seconds."""
    started = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        done = subprocess.run(
            [sys.executable, str(ROOT / script), *arguments, f"hydra.run.dir={out / name}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"},
        )
    if done.returncode != 0:
        tail = (out / f"{name}.log").read_text().strip().splitlines()[-1:]
        raise SystemExit(f"error: {name}: exit {done.returncode}: {tail[0] if tail else ''} (log: {out / name}.log)")
    return time.perf_counter() - started


def forget_list(model: Path, out: Path) -> Path:
    """A forget request: the first two members of the model's largest cluster, one by id, one by file name."""
    from dsire.unlearning.model import load_model

    members = max(load_model(model).members.values(), key=len)
    path = out / "forget.csv"
    path.write_text(f"example\n{members[0]}\n{Path(members[1]).name}\n")
    return path


@report_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "vit_check")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="of the audit and step timing")
    parser.add_argument("--images", type=int, default=200, help="digits in the image folder (half public)")
    parser.add_argument("--private", type=int, default=32, help="task.private_limit")
    parser.add_argument("--steps", type=int, default=5, help="pretraining and fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank on every block's qkv")
    parser.add_argument("--ensemble", type=int, default=3, help="models trained at once (mia.ensemble_size)")
    args = parser.parse_args()
    args.out = args.out.resolve()
    inputs = args.out / "inputs"
    args.out.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]
    started = time.perf_counter()
    make_inputs(inputs, args.images, 224)
    seconds = {"inputs": time.perf_counter() - started}
    common = overrides(args, inputs)
    steps = step_seconds(args, common)
    audit = [
        "+experiment=mia_rank_tiny",
        *common,
        f"mia.configurations=[{{method: lora, rank: {args.rank}}}]",
        "mia.shadow_models=4",
        "mia.target_models=2",
        "mia.resamples=100",
        f"mia.ensemble_size={args.ensemble}",
        f"lab.accelerator={args.accelerator}",
    ]
    seconds["audit"] = run("audit", "audit.py", audit, args.out)
    seconds["unlearn_fit"] = run("unlearn_fit", "unlearn.py", [*common, "unlearning.clustering.n_clusters=2"], args.out)
    model = args.out / "unlearn_fit" / "model.safetensors"
    request = forget_list(model, args.out)
    for mode in ("forget", "retrain"):
        seconds[mode] = run(mode, "unlearn.py", [f"ckpt={model}", f"forget={request}", f"mode={mode}"], args.out)
    mia = json.loads((args.out / "audit" / "mia.json").read_text())[f"lora_r{args.rank}"]
    fit = json.loads((args.out / "unlearn_fit" / "fit.json").read_text())
    receipts = {mode: json.loads((args.out / mode / "receipt.json").read_text()) for mode in ("forget", "retrain")}
    load.append(os.getloadavg()[0])
    report = {"seconds": seconds, "steps": steps, "mia": mia, "fit": fit, "receipts": receipts, "load": load}
    atomic_write_text(args.out / "vit_check.json", json.dumps(report, indent=1))
    markdown = summary(args, report)
    atomic_write_text(args.out / "vit_check.md", markdown)
    write_section(f"vit_{args.accelerator}", markdown)
    print(markdown)


def summary(args: argparse.Namespace, report: dict) -> str:
    seconds, steps, mia, fit, receipts = (report[k] for k in ("seconds", "steps", "mia", "fit", "receipts"))
    forget, retrain = receipts["forget"], receipts["retrain"]
    same = forget["new_model_sha256"] == retrain["new_model_sha256"]
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"{os.cpu_count()} CPU threads"
    lab = (
        "pretrained backbone read from its cache" if steps["pretrain_cached"] else "head pretrained on the public split"
    )
    rows = [
        ("inputs (image folder, random ViT-B/16 weights file)", f"{seconds['inputs']:.1f}"),
        (f"the lab: {lab}", f"{steps['pretrain_seconds']:.1f}"),
        (
            f"one training step of {args.ensemble} models ({steps['images_per_step']} images, forward and backward)",
            f"{steps['train_seconds_per_step']:.2f}",
        ),
        (
            f"logits of {args.ensemble} models on the private split ({steps['logits_images']} image passes)",
            f"{steps['logits_seconds']:.1f}",
        ),
        ("`audit.py` (4 shadow + 2 target models, white-box scores included)", f"{seconds['audit']:.0f}"),
        ("`unlearn.py` fit (2 clusters)", f"{seconds['unlearn_fit']:.0f}"),
        ("`unlearn.py` forget of 2 examples", f"{seconds['forget']:.0f}"),
        ("`unlearn.py` mode=retrain of the same request", f"{seconds['retrain']:.0f}"),
    ]
    table = "\n".join(f"| {what} | {value} |" for what, value in rows)
    attacks = mia["attacks"]
    return f"""### ViT-B/16 recipe, {args.accelerator} (random weights, digits upscaled to 224 px)

`{command_line()}` on {device}, torch {torch.__version__}: {args.images} images, {args.private} private,
LoRA r={args.rank} on every block's `qkv`, {args.steps} steps of batch {args.batch_size},
{args.ensemble} models at once; 1-minute load average {report["load"][0]:.1f} at the start, {report["load"][1]:.1f}
at the end (other jobs on the machine slow every figure). Wall seconds (each script's, start-up and model
loading included):

| what | seconds |
| --- | ---: |
{table}

mia.json (`lora_r{args.rank}`): test accuracy {mia["test_accuracy"]:.3f}, LiRA AUC {mia["auc"]:.3f}
[{mia["auc_ci"][0]:.3f}, {mia["auc_ci"][1]:.3f}], loss AUC {attacks["loss"]["auc"]:.3f}, white-box AUC
{attacks["white_box"]["auc"]:.3f} (random weights and {args.private} examples: chance-level numbers are expected).
Unlearning: fit test accuracy {fit["test_accuracy"]:.3f}, members per cluster {fit["members"]},
{fit["parameters_per_cluster"]} adapter parameters per cluster on a {fit["parameters_backbone"]}-parameter
backbone; forget retrained clusters {forget["clusters_retrained"]} ({forget["parameters_retrained"]} parameters,
{forget["examples_reprocessed"]} examples reprocessed) in {forget["seconds"]:.1f} s, retrain in
{retrain["seconds"]:.1f} s; forget and retrain wrote {"the same bytes" if same else "**different bytes**"}
(sha256 {forget["new_model_sha256"][:12]}…).
"""


if __name__ == "__main__":
    main()
