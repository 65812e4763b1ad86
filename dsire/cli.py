"""`dsire` command line: `dsire inspect FILE [--json]`, `dsire harvest DIR [--out CSV]`,
`dsire audit-membership FINETUNE --backbone B --candidates C --reference R [--out CSV]`,
`dsire lorawise ZOO OUT.parquet [--nested]`."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dsire.atomic import atomic_write_csv
from dsire.data.sources import from_labels_dir, from_manifest
from dsire.errors import EXIT_CODE, UserError, user_error
from dsire.harvest import CONCEPT_SOURCES, harvest, write_labels
from dsire.lora import FORMATS, LoRA, LoRAError, load_lora, subset_rank
from dsire.lora.family import guess_base_model
from dsire.lora.lorawise import write_lorawise
from dsire.settings import require_device
from dsire.spectra import Spectra, lora_spectra


def inspect_report(lora: LoRA, spectra: dict[str, Spectra]) -> dict:
    """Everything `inspect` shows, as plain JSON-ready data."""
    return {
        "source": lora.source,
        "format": lora.format,
        "base_model": guess_base_model(lora),
        "notes": lora.notes,
        "labels": lora.labels,
        "metadata": lora.metadata,  # kohya `ss_*` training facts, zoo labels, diffusers adapter config
        "layers": {
            name: {
                "rank": layer.rank,
                "shape": list(layer.shape),
                "kernel": list(layer.kernel),
                "alpha": layer.alpha,
                "alpha_given": layer.alpha_given,
                "scale": layer.scale,
                "norm": float(spectra[name].delta_norm),
                "singular_values": spectra[name].delta.tolist(),
            }
            for name, layer in lora.layers.items()
        },
    }


def _print_report(report: dict, top: int, console: Console) -> None:
    ranks = sorted({layer["rank"] for layer in report["layers"].values()})
    console.print(f"[bold]{report['source']}[/bold]")
    console.print(f"format: {report['format']}   base model: {report['base_model']}")
    console.print(f"layers: {len(report['layers'])}   rank: {', '.join(map(str, ranks))}")
    for key, value in {**report["labels"], **report["metadata"]}.items():
        text = str(value)
        console.print(f"  {key}: {text if len(text) <= 200 else text[:200] + '…'}")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    table = Table()
    table.add_column("layer", overflow="fold")
    for column in ("rank", "shape", "scale", "‖ΔW‖F"):
        table.add_column(column, no_wrap=True)
    table.add_column(f"top {top} σ(ΔW)", overflow="fold")
    for name, layer in report["layers"].items():
        sigma = " ".join(f"{s:.3g}" for s in layer["singular_values"][:top])
        shape = "×".join(map(str, layer["shape"])) + (
            f" (conv {'×'.join(map(str, layer['kernel']))})" if layer["kernel"] else ""
        )
        table.add_row(name, str(layer["rank"]), shape, f"{layer['scale']:.4g}", f"{layer['norm']:.4g}", sigma)
    console.print(table)


def _inspect(args: argparse.Namespace) -> int:
    try:
        require_device("--device", args.device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CODE
    try:
        lora = load_lora(args.file, args.format, allow_torch_load=args.allow_torch_load, rank=args.rank, row=args.row)
    except LoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    dtype = torch.float64 if args.float64 else torch.float32
    report = inspect_report(lora, lora_spectra(lora, device=args.device, dtype=dtype))
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_report(report, args.top, Console())
    return 0


def _harvest(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        print(f"error: {root}: not a directory", file=sys.stderr)
        return 1
    result = harvest(root, recursive=args.recursive, concept_from=args.concept_from)
    for file, reason in result.skipped.items():
        print(f"skipped {file}: {reason}")
    print(f"{len(result.rows)} labelled, {len(result.skipped)} skipped")
    if not result.rows:
        print(f"error: no LoRA in {root} claims a usable training-set size; nothing written", file=sys.stderr)
        return 1
    print("LoRAs per dataset size:")
    for n, count in sorted(Counter(row["n"] for row in result.rows).items()):
        print(f"  n={n}: {count}")
    out = Path(args.out) if args.out else root / "harvest.csv"
    try:
        write_labels(result.rows, out)
    except OSError as exc:
        print(f"error: {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _lorawise(args: argparse.Namespace) -> int:
    """A zoo (manifest or labels.csv folder) as one LoRA-WiSE parquet file; flat columns need the rank
    in the file's name, as the published subsets have it (`low_8.parquet`), or readers cannot reshape them."""
    zoo, out = Path(args.zoo), Path(args.out)
    try:
        entries = from_manifest(zoo / "manifest.csv") if (zoo / "manifest.csv").is_file() else from_labels_dir(zoo)
        loras = [(entry.load(), entry.n, entry.concept) for entry in entries]
    except (LoRAError, OSError) as exc:
        print(f"error: {user_error(exc) or exc}", file=sys.stderr)
        return 1
    ranks = {layer.rank for lora, _, _ in loras for layer in lora.layers.values()}
    if not args.nested and (len(ranks) != 1 or subset_rank(out) not in ranks):
        problem = f"ranks {sorted(ranks)}" if len(ranks) != 1 else f"rank {ranks.pop()} is not in its name"
        hint = "name it after its subset (e.g. low_8.parquet) or pass --nested"
        print(f"error: {out}: {problem}; {hint}", file=sys.stderr)
        return 1
    try:
        write_lorawise(loras, out, nested=args.nested)
    except (LoRAError, OSError) as exc:
        print(f"error: {user_error(exc) or exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(loras)} LoRAs of {len({c for _, _, c in loras})} concepts to {out}")
    return 0


def _audit_membership(args: argparse.Namespace) -> int:
    from dsire.privacy.auditor import ATTACKS as AUDIT_ATTACKS  # the lab's imports (peft, opacus) only when used
    from dsire.privacy.auditor import audit_membership

    try:
        result = audit_membership(
            Path(args.finetune),
            Path(args.backbone),
            Path(args.candidates),
            Path(args.reference),
            args.image_size,
            args.allow_torch_load,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    columns = ["example", "label"] + [f"{a}_{part}" for a in AUDIT_ATTACKS for part in ("score", "p_value")]
    rows = [
        [identifier, label] + [v for a in AUDIT_ATTACKS for v in (result.scores[a][i], result.p_values[a][i])]
        for i, (identifier, label) in enumerate(zip(result.ids, result.labels, strict=True))
    ]
    if args.out:
        atomic_write_csv(args.out, columns, rows)
        print(f"wrote {args.out}")
    else:
        table = Table(*columns)
        for row in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
        Console(width=200).print(table)
    for attack in AUDIT_ATTACKS:
        flagged = int((result.p_values[attack] < args.level).sum())
        expected = f"non-members: ≤ {args.level:.0%} expected"
        print(f"{attack}: {flagged} of {len(rows)} candidates below p = {args.level} ({expected})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsire", description="What data went into this fine-tuned model?")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="format, base model, layers, ranks, scales and spectra of a LoRA")
    inspect.add_argument("file", help="LoRA file, PEFT/diffusers directory, or LoRA-WiSE parquet file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="override format detection")
    inspect.add_argument("--rank", type=int, help="rank of flat LoRA-WiSE columns (default: from the subset path)")
    inspect.add_argument("--row", type=int, default=0, help="row of a LoRA-WiSE parquet file")
    inspect.add_argument("--top", type=int, default=4, help="singular values shown per layer in the table")
    inspect.add_argument("--device", default="cpu", help="device for the spectra, e.g. cuda")
    inspect.add_argument("--float64", action="store_true", help="compute spectra in float64")
    inspect.add_argument(
        "--allow-torch-load",
        action="store_true",
        help="read .ckpt/.pt/.bin files with torch.load(weights_only=True) (pickle-based: untrusted files are a risk)",
    )
    inspect.set_defaults(run=_inspect)
    harvest_command = commands.add_parser(
        "harvest", help="label a folder of kohya LoRAs with the image counts in their metadata (a zoo to train on)"
    )
    harvest_command.add_argument("dir", help="folder of .safetensors LoRAs")
    harvest_command.add_argument("--out", help="CSV to write (default: DIR/harvest.csv); its paths are relative to DIR")
    harvest_command.add_argument("--recursive", action="store_true", help="also read the folders below DIR")
    harvest_command.add_argument(
        "--concept-from",
        default="output_name",
        choices=CONCEPT_SOURCES,
        help="group kept on one side of a split: the run's ss_output_name (default) or the file's folder",
    )
    harvest_command.set_defaults(run=_harvest)
    membership = commands.add_parser(
        "audit-membership", help="were these examples in my fine-tune? loss and white-box scores with p-values"
    )
    membership.add_argument("finetune", help="the fine-tune: a LoRA in any format dsire reads, or a whole state dict")
    membership.add_argument("--backbone", required=True, help="the public backbone it started from (.safetensors)")
    membership.add_argument("--candidates", required=True, help="CSV (column example: digits/17, ...) or image folder")
    membership.add_argument("--reference", required=True, help="known non-members, as --candidates (≥ 19)")
    membership.add_argument("--image-size", type=int, default=224, help="side of the images of image folders")
    membership.add_argument("--level", type=float, default=0.05, help="p-value below which a candidate is counted")
    membership.add_argument("--out", help="write the scores and p-values as CSV (atomically)")
    membership.add_argument(
        "--allow-torch-load", action="store_true", help="read .ckpt/.pt/.bin LoRAs with torch.load(weights_only=True)"
    )
    membership.set_defaults(run=_audit_membership)
    lorawise = commands.add_parser("lorawise", help="write a zoo as one LoRA-WiSE parquet file (label, name, weights)")
    lorawise.add_argument("zoo", help="a zoo folder: manifest.csv (python -m dsire.zoo) or labels.csv (file,n,concept)")
    lorawise.add_argument("out", help="the parquet file; flat columns need the rank in its name, e.g. low_8.parquet")
    lorawise.add_argument("--nested", action="store_true", help="matrices as lists of rows (no rank needed to read)")
    lorawise.set_defaults(run=_lorawise)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
