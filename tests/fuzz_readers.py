"""A bounded, seeded fuzz of the LoRA readers; tests/test_fuzz.py runs it in a fresh process.

`python tests/fuzz_readers.py SEED SAFETENSORS_CASES PARQUET_CASES` mutates a valid kohya
safetensors file and a valid LoRA-WiSE parquet file (bit flips, truncations, random overwrites,
spliced chunks, forged header lengths and header entries), reads every mutant, and prints one JSON
line: the cases run, how many were read and how many refused with LoRAError, every other
exception (there should be none), and how much the process's peak RSS grew while fuzzing. A fresh
process makes the peak RSS measure this fuzz alone.
"""

from __future__ import annotations

import json
import random
import resource
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save

from dsire.data.sources import from_parquet_files
from dsire.lora import LoRAError, load_lora, read_lorawise

MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
RANK, WIDTH = 4, 32


def valid_safetensors() -> bytes:
    g = torch.Generator().manual_seed(0)
    state = {}
    for proj in ("to_q", "to_k", "to_v"):
        name = f"lora_unet_{MODULE.replace('.', '_')}_{proj}"
        state[f"{name}.lora_down.weight"] = torch.randn(RANK, WIDTH, generator=g)
        state[f"{name}.lora_up.weight"] = torch.randn(WIDTH, RANK, generator=g).half()
        state[f"{name}.alpha"] = torch.tensor(2.0)
    return save(state, metadata={"ss_num_train_images": "7"})


def valid_parquet(path: Path) -> bytes:
    """Three rows in the LoRA-WiSE schema, flat float64 columns, one row group per row."""
    g = torch.Generator().manual_seed(1)
    columns: dict[str, list] = {"label": [1, 2, 3], "name": ["a", "b", "c"]}
    for proj in ("to_q", "to_v"):
        for role in ("down", "up"):
            values = [torch.randn(RANK * WIDTH, generator=g).double().tolist() for _ in range(3)]
            columns[f"unet.{MODULE}.{proj}.lora.{role}.weight"] = values
    pq.write_table(pa.table(columns), path, row_group_size=1)
    return path.read_bytes()


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # flip a few bits
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del b[rng.randrange(len(b)) :]
    elif kind == 2:  # overwrite a run with random bytes
        start, length = rng.randrange(len(b)), rng.randint(1, 64)
        b[start : start + length] = rng.randbytes(length)
    else:  # copy a chunk elsewhere
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        at = rng.randrange(len(b))
        b[at:at] = b[i:j]
    return bytes(b)


HUGE = (2**31, 2**40, 2**63 - 1, 2**64 - 1)


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    """Well-formed JSON that lies: huge shapes and offsets, odd dtypes, wrong types, a forged length."""
    (length,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    if rng.random() < 0.2:
        return struct.pack("<Q", rng.choice(HUGE)) + data[8:]
    name = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["shape", "data_offsets", "dtype", "entry", "metadata"])
    if field == "shape":
        header[name]["shape"] = rng.choice([[rng.choice(HUGE)] * 2, [-1, 4], [True, 4], [], [0], "4x4", [4.5]])
    elif field == "data_offsets":
        header[name]["data_offsets"] = rng.choice([[0, rng.choice(HUGE)], [8, 0], [-8, 0], [0], None, [0, 1.5]])
    elif field == "dtype":
        header[name]["dtype"] = rng.choice(["BOOL", "C64", "F8_E5M2", "U64", "I8", "", 7, None])
    elif field == "entry":
        header[name] = rng.choice([None, [], "x", {}, {"dtype": "F32"}])
    else:
        header["__metadata__"] = rng.choice([[], "x", {"k": 1}, {"k": None}, {"lora_adapter_metadata": "{"}])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def read_safetensors_case(path: Path) -> None:
    load_lora(path)


def read_parquet_case(path: Path) -> None:
    list(read_lorawise(path))
    from_parquet_files([path])


def run(
    cases: int, path: Path, valid: bytes, mutators: list[Callable], read: Callable, rng: random.Random, report: dict
) -> None:
    for case in range(cases):
        path.write_bytes(rng.choice(mutators)(valid, rng))
        try:
            read(path)
            report["read"] += 1
        except LoRAError:
            report["refused"] += 1
        except Exception as exc:  # anything else is a finding: keep the case to replay
            report["unexpected"].append(f"{path.name} case {case}: {type(exc).__name__}: {exc}")
        report["cases"] += 1


def main(seed: int, safetensors_cases: int, parquet_cases: int) -> dict:
    rng = random.Random(seed)
    report: dict = {"cases": 0, "read": 0, "refused": 0, "unexpected": []}
    with tempfile.TemporaryDirectory() as tmp:
        st_path, pq_path = Path(tmp) / "case.safetensors", Path(tmp) / "low_4.parquet"
        st_valid = valid_safetensors()
        pq_valid = valid_parquet(pq_path)
        st_path.write_bytes(st_valid)
        read_safetensors_case(st_path)  # warm up every code path before taking the baseline
        read_parquet_case(pq_path)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(safetensors_cases, st_path, st_valid, [mutate_bytes, mutate_header], read_safetensors_case, rng, report)
        run(parquet_cases, pq_path, pq_valid, [mutate_bytes], read_parquet_case, rng, report)
        report["peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    return report


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:4]))))
