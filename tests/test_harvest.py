"""`dsire harvest` and predict.py's claimed N, on kohya files whose metadata is written as kohya writes it."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from dsire.data.sources import ZooEntry, from_labels_dir
from dsire.harvest import LABEL_COLUMNS, claimed_columns, harvest, write_labels
from dsire.lora.save import save_lora
from dsire.predict import render
from tests.conftest import FineTune, make_finetune, run_dsire, run_script, tiny_unet


def kohya_metadata(output_name: str, dirs: dict[str, tuple[int, int]], **overrides: str) -> dict[str, str]:
    """kohya train_network.py's metadata: every value a string, `ss_dataset_dirs` a JSON string.

    `dirs` is {folder: (img_count, n_repeats)}; `ss_num_train_images` counts the repeats, as kohya's does.
    """
    return {
        "ss_output_name": output_name,
        "ss_num_train_images": str(sum(count * repeats for count, repeats in dirs.values())),
        "ss_dataset_dirs": json.dumps({d: {"n_repeats": r, "img_count": c} for d, (c, r) in dirs.items()}),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_network_module": "networks.lora",
        "ss_learning_rate": "0.0001",
        "ss_max_train_steps": "1200",
        "ss_num_epochs": "10",
        "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
        "ss_base_model_version": "sd_v1",
        **overrides,
    }


def write(finetune: FineTune, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A kohya file through the project's writer, which adds ss_network_dim/alpha from the config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_lora(finetune.state, path, "kohya", finetune.config.to_dict(), metadata=metadata)


def write_raw(path: Path, header: bytes) -> Path:
    """A safetensors file with exactly this header and no tensors."""
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


RECIPE = {
    "rank": "4",
    "alpha": "8",  # unet_finetune: r=4, lora_alpha=8
    "network_module": "networks.lora",
    "learning_rate": "0.0001",
    "max_train_steps": "1200",
    "epochs": "10",
    "base_model": "v1-5-pruned-emaonly.safetensors",
    "base_model_version": "sd_v1",
}


def test_harvest_labels_and_recipe(unet_finetune: FineTune, tmp_path):
    zoo = tmp_path / "zoo"
    cat = kohya_metadata("cat", {"10_cat": (12, 10)})
    write(unet_finetune, zoo / "cat.safetensors", cat)
    write(unet_finetune, zoo / "cat-000005.safetensors", cat)  # an epoch of the same run
    dog = {"5_dog": (8, 5), "2_dog closeup": (3, 2)}
    write(unet_finetune, zoo / "dog.safetensors", kohya_metadata("dog", dog, ss_sd_model_name="\x1b]0;pwned\x07"))
    # one folder in two datasets (two resolutions): kohya lists it again as "img (2)"; its 7 images count once
    multires = kohya_metadata("None", {"img": (7, 3), "img (2)": (7, 3)}, ss_network_alpha="None")
    write(unet_finetune, zoo / "multires.safetensors", multires)
    write(unet_finetune, zoo / "civitai_no_metadata.safetensors")
    write(unet_finetune, zoo / "sub" / "deep.safetensors", kohya_metadata("deep", {"1_deep": (2, 1)}))
    (zoo / "notes.txt").write_text("not a LoRA")

    flat = harvest(zoo)
    assert flat.skipped == {
        "civitai_no_metadata.safetensors": "no ss_dataset_dirs, so the number of distinct images is unknown"
    }
    cat_row = {"n": 12, "concept": "cat", "repeats": "10", "images_with_repeats": 120, **RECIPE, "output_name": "cat"}
    assert flat.rows == [
        {"file": "cat-000005.safetensors", **cat_row},
        {"file": "cat.safetensors", **cat_row},
        {
            "file": "dog.safetensors",
            "n": 11,
            "concept": "dog",
            "repeats": "5;2",
            "images_with_repeats": 46,
            **RECIPE,
            "base_model": "",  # unprintable: not copied
            "output_name": "dog",
        },
        {
            "file": "multires.safetensors",
            "n": 7,
            "concept": "multires",  # output_name "None" (unset in kohya): the file name
            "repeats": "3;3",
            "images_with_repeats": 42,
            **RECIPE,
            "alpha": "",
            "output_name": "",
        },
    ]

    deep = harvest(zoo, recursive=True, concept_from="dir")
    assert [(row["file"], row["n"], row["concept"]) for row in deep.rows] == [
        ("cat-000005.safetensors", 12, "."),
        ("cat.safetensors", 12, "."),
        ("dog.safetensors", 11, "."),
        ("multires.safetensors", 7, "."),
        ("sub/deep.safetensors", 2, "sub"),
    ]

    write_labels(deep.rows, zoo / "harvest.csv")
    with (zoo / "harvest.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == LABEL_COLUMNS
        assert next(reader) == {k: str(v) for k, v in deep.rows[0].items()}
    assert from_labels_dir(zoo, "harvest.csv")[-1] == ZooEntry(str(zoo / "sub" / "deep.safetensors"), 2, "sub")


def test_hostile_metadata_is_skipped_with_a_reason(unet_finetune: FineTune, tmp_path):
    def dirs(info: object) -> str:
        return json.dumps({"10_x": info})

    def bad(field: str, value: str, limit: int) -> str:
        return f"ss_dataset_dirs['10_x'].{field} is {value}, not a whole number in 1…{limit}"

    too_long_or_deep = "ss_dataset_dirs is not valid JSON (a number too long or nesting too deep)"
    cases = {
        "negative": ({"ss_dataset_dirs": dirs({"n_repeats": 10, "img_count": -3})}, bad("img_count", "-3", 10**6)),
        "absurd": (
            {"ss_dataset_dirs": dirs({"n_repeats": 1, "img_count": 10**12})},
            bad("img_count", "1000000000000", 10**6),
        ),
        "boolean": ({"ss_dataset_dirs": dirs({"n_repeats": True, "img_count": 3})}, bad("n_repeats", "True", 10**4)),
        "text": ({"ss_dataset_dirs": dirs({"n_repeats": "ten", "img_count": 3})}, bad("n_repeats", "'ten'", 10**4)),
        "missing": ({"ss_dataset_dirs": dirs({"n_repeats": 10})}, bad("img_count", "None", 10**6)),
        "float": ({"ss_dataset_dirs": dirs({"n_repeats": 1, "img_count": 2.5})}, bad("img_count", "2.5", 10**6)),
        "bad_json": (
            {"ss_dataset_dirs": "{not json"},
            "ss_dataset_dirs is not valid JSON (Expecting property name enclosed in double quotes at character 1)",
        ),
        "deep_json": ({"ss_dataset_dirs": "[" * 100_000}, too_long_or_deep),  # json.loads: RecursionError
        "huge_number": (  # json.loads: ValueError (over 4300 digits)
            {"ss_dataset_dirs": '{"10_x": {"n_repeats": 1, "img_count": ' + "1" * 5000 + "}}"},
            too_long_or_deep,
        ),
        "not_object": ({"ss_dataset_dirs": "[1, 2]"}, "ss_dataset_dirs is [1, 2], not a non-empty JSON object"),
        "empty": ({"ss_dataset_dirs": "{}"}, "ss_dataset_dirs is {}, not a non-empty JSON object"),
        "entry": ({"ss_dataset_dirs": dirs(5)}, "ss_dataset_dirs['10_x'] is 5, not an object"),
        "long_name": (
            {"ss_dataset_dirs": json.dumps({"x" * 500: 5})},
            f"ss_dataset_dirs['{'x' * 39}…] is 5, not an object",  # a stranger's name, cut to 40 characters
        ),
        "contradiction": (
            kohya_metadata("x", {"10_x": (12, 10)}, ss_num_train_images="999"),
            "ss_num_train_images is 999 but ss_dataset_dirs add up to 120 images × repeats",
        ),
        "exponent": (
            kohya_metadata("x", {"10_x": (12, 10)}, ss_num_train_images="1.2e2"),
            "ss_num_train_images is '1.2e2', not a whole number in 1…10000000000",
        ),
        "too_many": (
            kohya_metadata("x", {"1_a": (600_000, 1), "1_b": (600_000, 1)}),
            "ss_dataset_dirs add up to 1200000 images, over 1000000",
        ),
        "only_total": (
            {"ss_num_train_images": "120"},
            "no ss_dataset_dirs, so the number of distinct images is unknown",
        ),
    }
    expected = {}
    for name, (metadata, reason) in cases.items():
        write(unet_finetune, tmp_path / f"{name}.safetensors", metadata)
        expected[f"{name}.safetensors"] = reason
    write_raw(tmp_path / "number_metadata.safetensors", b'{"__metadata__": {"ss_dataset_dirs": 12}}')
    write_raw(tmp_path / "deep_header.safetensors", b'{"__metadata__": ' + b"[" * 100_000)
    good = write(unet_finetune, tmp_path / "good.safetensors", kohya_metadata("x", {"10_x": (12, 10)}))
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:100])
    expected |= {
        "number_metadata.safetensors": "malformed safetensors metadata (not an object of strings)",
        "truncated.safetensors": "truncated: the file ends inside the safetensors header",
    }

    result = harvest(tmp_path)
    assert [row["file"] for row in result.rows] == ["good.safetensors"]
    reasons = dict(result.skipped)
    assert reasons.pop("deep_header.safetensors").startswith("malformed safetensors header (")
    assert reasons == expected


def test_claimed_columns(unet_finetune: FineTune, tmp_path):
    kohya = write(unet_finetune, tmp_path / "k.safetensors", kohya_metadata("k", {"10_k": (12, 10)}))
    assert claimed_columns(kohya) == {"claimed_n": 12, "claimed_images_with_repeats": 120}
    total_only = write(unet_finetune, tmp_path / "t.safetensors", {"ss_num_train_images": "120"})
    assert claimed_columns(total_only) == {"claimed_n": None, "claimed_images_with_repeats": 120}
    config = unet_finetune.config.to_dict()
    metadata = kohya_metadata("p", {"p": (3, 1)})
    peft = save_lora(unet_finetune.state, tmp_path / "peft", "peft", config, metadata=metadata)
    assert claimed_columns(peft.parent) == {"claimed_n": 3, "claimed_images_with_repeats": 3}
    torch.save(unet_finetune.state, tmp_path / "k.pt")
    nothing = {"claimed_n": None, "claimed_images_with_repeats": None}
    for path in (write(unet_finetune, tmp_path / "plain.safetensors"), tmp_path / "k.pt", tmp_path / "x.parquet#row=1"):
        assert claimed_columns(path) == nothing


ROWS = [
    {
        "file": "a.safetensors",
        "predicted_n": 10,
        "claimed_n": 12,
        "claimed_images_with_repeats": 120,
        "estimated_n": 9.5,
        "interval_low": 5.0,
        "interval_high": 18.0,
        "beyond_zoo_sizes": False,
        "mismatch_p": 0.5,
        "recipe_mismatch": False,
        "vote_share": 0.75,
        "nearest_distance": 0.5,
        "disagreeing_voters": 0,
        "disagreeing_layers": "",
    },
    {
        "file": "b.safetensors",
        "predicted_n": 3,
        "claimed_n": None,
        "claimed_images_with_repeats": None,
        "estimated_n": 3.2,
        "interval_low": 1.5,
        "interval_high": None,
        "beyond_zoo_sizes": True,
        "mismatch_p": 0.01,
        "recipe_mismatch": True,
        "vote_share": 1.0,
        "nearest_distance": 0.25,
        "disagreeing_voters": 2,
        "disagreeing_layers": "unet.a (2)",
    },
]


def test_render_shows_claimed_next_to_predicted(capsys, monkeypatch):
    assert render(ROWS, {}, "csv") == (
        "file,predicted_n,claimed_n,claimed_images_with_repeats,estimated_n,interval_low,interval_high,"
        "beyond_zoo_sizes,mismatch_p,"
        "recipe_mismatch,vote_share,nearest_distance,disagreeing_voters,disagreeing_layers\n"
        "a.safetensors,10,12,120,9.5,5.0,18.0,False,0.5,False,0.75,0.5,0,\n"
        "b.safetensors,3,,,3.2,1.5,,True,0.01,True,1.0,0.25,2,unet.a (2)\n"
    )
    assert json.loads(render(ROWS, {}, "json") or "")["predictions"][1]["claimed_n"] is None
    monkeypatch.setenv("COLUMNS", "200")
    assert render(ROWS, {}, "table") is None
    table = capsys.readouterr().out
    assert "claimed N " in table and "(×repeats)" in table  # a two-line header
    a_line = next(line for line in table.splitlines() if "a.safetensors" in line)
    b_line = next(line for line in table.splitlines() if "b.safetensors" in line)
    assert [cell.strip() for cell in a_line.split("│")[1:9]] == [
        "a.safetensors",
        "10",
        "12 (120)",
        "9.5 [5, 18]",
        "0.500",
        "0.75",
        "0.5",
        "0",
    ]
    assert [cell.strip() for cell in b_line.split("│")[4:6]] == ["3.2 [1.5, ?]", "0.010 (!)"]
    below_b = table.splitlines()[table.splitlines().index(b_line) + 1]
    assert below_b.split("│")[4].strip() == "(beyond zoo)"  # on the estimate's second line


def test_harvest_cli(unet_finetune: FineTune, tmp_path):
    zoo = tmp_path / "zoo"
    write(unet_finetune, zoo / "cat.safetensors", kohya_metadata("cat", {"10_cat": (12, 10)}))
    write(unet_finetune, zoo / "sub" / "dog.safetensors", kohya_metadata("dog", {"5_dog": (11, 5)}))
    (zoo / "broken.safetensors").write_bytes(b"\x00" * 3)
    result = run_dsire("harvest", str(zoo), "--recursive", "--concept-from", "dir")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "skipped broken.safetensors: truncated: shorter than a safetensors header",
        "2 labelled, 1 skipped",
        "LoRAs per dataset size:",
        "  n=11: 1",
        "  n=12: 1",
        f"wrote {zoo / 'harvest.csv'}",
    ]
    lines = (zoo / "harvest.csv").read_text().splitlines()
    assert lines[0].startswith("file,n,concept,repeats,images_with_repeats,rank,alpha,")
    assert [line.split(",")[:5] for line in lines[1:]] == [
        ["cat.safetensors", "12", ".", "10", "120"],
        ["sub/dog.safetensors", "11", "sub", "5", "55"],
    ]

    empty = tmp_path / "empty"
    write(unet_finetune, empty / "plain.safetensors")
    result = run_dsire("harvest", str(empty), "--out", str(tmp_path / "out.csv"))
    assert result.returncode == 1
    assert "0 labelled, 1 skipped" in result.stdout and "nothing written" in result.stderr
    assert not (tmp_path / "out.csv").exists()


def test_harvested_folder_trains_and_predict_shows_claimed_n(tmp_path):
    """kohya files → `dsire harvest` → `train.py data=labels_dir` → `predict.py` with claimed_n."""
    zoo = tmp_path / "zoo"
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"])
    claimed = {}
    for c in range(4):
        for n in (1, 3, 6):
            finetune = make_finetune(tiny_unet(), config, "unet", seed=10 * c + n)
            metadata = kohya_metadata(f"concept{c}", {f"10_concept{c}": (n, 10)})
            path = write(finetune, zoo / f"concept{c}_n{n}.safetensors", metadata)
            claimed[str(path)] = n
    unlabelled = write(make_finetune(tiny_unet(), config, "unet", seed=99), zoo / "unlabelled.safetensors")
    claimed[str(unlabelled)] = None

    harvested = run_dsire("harvest", str(zoo))
    assert harvested.returncode == 0, harvested.stderr
    assert "12 labelled, 1 skipped" in harvested.stdout

    out = tmp_path / "run"
    trained = run_script(
        "train.py",
        "data=labels_dir",
        f"data.source.path={zoo}",
        "data.source.labels=harvest.csv",
        "data.split.folds=2",
        "logger=csv",
        f"hydra.run.dir={out}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    splits = json.loads((out / "metrics.json").read_text())["splits"]
    assert sum(len(split["predictions"]) for split in splits) == 12

    predicted = run_script("predict.py", f"ckpt={out / 'dsire.safetensors'}", f"lora={zoo}", "output=json")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = json.loads(predicted.stdout)["predictions"]
    assert {row["file"]: row["claimed_n"] for row in rows} == claimed
    assert all(list(row)[:3] == ["file", "predicted_n", "claimed_n"] for row in rows)
    assert {row["predicted_n"] for row in rows} <= {1, 3, 6}


def test_unknown_concept_source(tmp_path):
    with pytest.raises(ValueError, match="concept_from must be one of"):
        harvest(tmp_path, concept_from="folder")
