"""Real-world labels: the training-set sizes that kohya-trained LoRAs claim in their metadata.

kohya-ss sd-scripts (`train_network.py`) writes its training facts into the safetensors header,
every value as a string (`{k: str(v)}`, so unset options read "None"). The keys that label a LoRA
with its data:

- `ss_dataset_dirs`: JSON `{folder name: {"n_repeats": int, "img_count": int}}`, one entry per
  training image folder (regularisation folders go to `ss_reg_dataset_dirs` and are not counted).
  `img_count` is the number of distinct images found in the folder; `n_repeats` is how often each
  is shown per epoch (the 10 of a `10_mychar` folder). A dataset config that uses one folder in
  several datasets (e.g. at several resolutions) lists the later uses as `name (2)`, `name (3)`, ….
- `ss_num_train_images`: the number of training images *including repeats*, Σ img_count × n_repeats
  over the listed folders (kohya's log calls it "num train images * repeats").

DSiRe's label is the number of distinct images: n = Σ img_count, each folder counted once.
Metadata comes from strangers: anything missing, malformed, absurd or self-contradicting makes the
file skipped with a reason, never a crash. Only the header is read, never the tensors.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dsire.atomic import atomic_write_csv
from dsire.lora.files import SAFETENSORS_SUFFIXES, read_safetensors_metadata
from dsire.lora.load import resolve_weights_file
from dsire.lora.model import LoRAError

MAX_IMAGES = 1_000_000  # distinct images of one LoRA; more is not a folder someone trained on
MAX_REPEATS = 10_000
MAX_TEXT = 200  # longest recipe value copied into the manifest
CONCEPT_SOURCES = ("output_name", "dir")
# manifest column: kohya key, copied as written, to group LoRAs by recipe (DSiRe compares like with like)
RECIPE_KEYS = {
    "rank": "ss_network_dim",
    "alpha": "ss_network_alpha",
    "network_module": "ss_network_module",
    "learning_rate": "ss_learning_rate",
    "max_train_steps": "ss_max_train_steps",
    "epochs": "ss_num_epochs",
    "base_model": "ss_sd_model_name",
    "base_model_version": "ss_base_model_version",
    "output_name": "ss_output_name",
}
# file, n, concept: what `data=labels_dir` reads; the rest is for people and for grouping
LABEL_COLUMNS = ("file", "n", "concept", "repeats", "images_with_repeats", *RECIPE_KEYS)


class LabelError(ValueError):
    """Metadata that gives no usable label; the message says why."""


@dataclass(frozen=True)
class Claim:
    """What a kohya file says about its training images."""

    n: int  # distinct images
    repeats: tuple[int, ...]  # n_repeats of each listed folder, in the file's order
    images_with_repeats: int | None  # ss_num_train_images, when the file has it


def _show(value: object) -> str:
    """A stranger's value, short enough for a one-line reason."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def _count(value: object, what: str, limit: int) -> int:
    """A whole number in 1…limit: a JSON integer or a string of digits (how kohya writes them)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,15}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise LabelError(f"{what} is {_show(value)}, not a whole number in 1…{limit}")
    return value


def images_with_repeats(metadata: Mapping[str, str]) -> int | None:
    """`ss_num_train_images` (images × repeats), None when absent; LabelError when malformed."""
    raw = metadata.get("ss_num_train_images")
    return None if raw is None else _count(raw, "ss_num_train_images", MAX_IMAGES * MAX_REPEATS)


def _is_reuse(name: str, img_count: int, dirs: dict[str, tuple[int, int]]) -> bool:
    """kohya's `name (2)`: a folder already listed as `name`, used again by another dataset."""
    match = re.fullmatch(r"(.*) \([0-9]+\)", name)
    return match is not None and match[1] in dirs and dirs[match[1]][0] == img_count


def read_claim(metadata: Mapping[str, str]) -> Claim:
    """The checked claim of one file's metadata; LabelError says why there is none."""
    raw = metadata.get("ss_dataset_dirs")
    if raw is None:
        raise LabelError("no ss_dataset_dirs, so the number of distinct images is unknown")
    try:
        listed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LabelError(f"ss_dataset_dirs is not valid JSON ({exc.msg} at character {exc.pos})") from exc
    except (ValueError, RecursionError) as exc:  # what json.loads raises for these
        raise LabelError("ss_dataset_dirs is not valid JSON (a number too long or nesting too deep)") from exc
    if not isinstance(listed, dict) or not listed:
        raise LabelError(f"ss_dataset_dirs is {_show(listed)}, not a non-empty JSON object")
    dirs: dict[str, tuple[int, int]] = {}  # name: (img_count, n_repeats)
    for name, info in listed.items():
        what = f"ss_dataset_dirs[{_show(name)}]"
        if not isinstance(info, dict):
            raise LabelError(f"{what} is {_show(info)}, not an object")
        dirs[name] = (
            _count(info.get("img_count"), f"{what}.img_count", MAX_IMAGES),
            _count(info.get("n_repeats"), f"{what}.n_repeats", MAX_REPEATS),
        )
    n = sum(count for name, (count, _) in dirs.items() if not _is_reuse(name, count, dirs))
    if n > MAX_IMAGES:
        raise LabelError(f"ss_dataset_dirs add up to {n} images, over {MAX_IMAGES}")
    with_repeats = images_with_repeats(metadata)
    listed_with_repeats = sum(count * repeats for count, repeats in dirs.values())
    if with_repeats is not None and with_repeats != listed_with_repeats:
        raise LabelError(
            f"ss_num_train_images is {with_repeats} but ss_dataset_dirs add up to {listed_with_repeats} "
            "images × repeats"
        )
    return Claim(n, tuple(repeats for _, repeats in dirs.values()), with_repeats)


def claimed_columns(path: str | Path) -> dict[str, int | None]:
    """predict.py's `claimed_n` and `claimed_images_with_repeats` of one LoRA; None where it claims nothing usable."""
    claimed: dict[str, int | None] = {"claimed_n": None, "claimed_images_with_repeats": None}
    try:
        weights = resolve_weights_file(Path(path))
        metadata = read_safetensors_metadata(weights) if weights.suffix.lower() in SAFETENSORS_SUFFIXES else {}
    except (LoRAError, OSError):  # not a file or folder with a readable header: nothing claimed
        return claimed
    with contextlib.suppress(LabelError):
        claimed["claimed_n"] = read_claim(metadata).n
    with contextlib.suppress(LabelError):
        claimed["claimed_images_with_repeats"] = images_with_repeats(metadata)
    return claimed


def _text(metadata: Mapping[str, str], key: str) -> str:
    """A recipe value as written, or "" when absent, "None" (unset in kohya), unprintable or over MAX_TEXT."""
    value = metadata.get(key, "")
    return value if value != "None" and len(value) <= MAX_TEXT and value.isprintable() else ""


def _concept(path: Path, root: Path, metadata: Mapping[str, str], concept_from: str) -> str:
    if concept_from == "dir":
        return path.parent.relative_to(root).as_posix()
    return _text(metadata, "ss_output_name") or path.stem


def lora_files(root: Path, recursive: bool = False) -> list[Path]:
    """The safetensors files in `root` (and below it when recursive), sorted."""
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in candidates if p.suffix.lower() in SAFETENSORS_SUFFIXES and p.is_file())


@dataclass
class Harvest:
    rows: list[dict[str, str | int]]  # one per labelled file, keys LABEL_COLUMNS
    skipped: dict[str, str]  # file: why it has no usable label


def harvest(root: str | Path, recursive: bool = False, concept_from: str = "output_name") -> Harvest:
    """Label every kohya LoRA under `root` with the distinct images its metadata claims.

    `file` is relative to `root`. The concept (the group kept on one side of a split) is the
    run's `ss_output_name` (all epochs of a run share it; the file name when unset), or with
    `concept_from="dir"` the file's folder relative to `root` ("." for files directly in it).
    """
    if concept_from not in CONCEPT_SOURCES:
        raise ValueError(f"concept_from must be one of {CONCEPT_SOURCES}, not {concept_from!r}")
    root = Path(root)
    result = Harvest([], {})
    for path in lora_files(root, recursive):
        file = path.relative_to(root).as_posix()
        try:
            metadata = read_safetensors_metadata(path)
            claim = read_claim(metadata)
        except LoRAError as exc:
            result.skipped[file] = exc.problem
            continue
        except (LabelError, OSError) as exc:
            result.skipped[file] = str(exc)
            continue
        result.rows.append(
            {
                "file": file,
                "n": claim.n,
                "concept": _concept(path, root, metadata, concept_from),
                "repeats": ";".join(map(str, claim.repeats)),
                "images_with_repeats": "" if claim.images_with_repeats is None else claim.images_with_repeats,
                **{column: _text(metadata, key) for column, key in RECIPE_KEYS.items()},
            }
        )
    return result


def write_labels(rows: list[dict[str, str | int]], path: str | Path) -> None:
    """The rows as CSV (LABEL_COLUMNS), written atomically: a labels file `data=labels_dir` reads."""
    atomic_write_csv(path, LABEL_COLUMNS, rows)
