"""`train.py`, SIGKILLed halfway through a spectra cache write; tests/test_faults.py runs it.

`python tests/kill_during_cache.py entry K [overrides]` dies halfway through writing the K-th cache
entry; `python tests/kill_during_cache.py hashes 0 [overrides]` dies halfway through writing
content_hashes.json. Only the lowest-level write is replaced (the file it writes is cut in half,
then the process kills itself), so the project's own code decides where those bytes go: a cache
that wrote in place would be left with a torn file. SIGKILL cannot be caught: nothing cleans up,
exactly as with `kill -9` from outside, but at the worst moment every time.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path
from typing import NoReturn

import dsire.data.cache as cache

ROOT = Path(__file__).resolve().parents[1]


def die() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_entry_write(k: int) -> None:
    save_file, calls = cache.save_file, [0]

    def torn_save(tensors, filename, *args, **kwargs) -> None:
        save_file(tensors, filename, *args, **kwargs)
        calls[0] += 1
        if calls[0] == k:
            os.truncate(filename, os.path.getsize(filename) // 2)
            die()

    cache.save_file = torn_save


def kill_in_hashes_write() -> None:
    write_text = Path.write_text

    def torn_write(self: Path, text: str, *args, **kwargs) -> int:
        if "content_hashes.json" not in self.name:
            return write_text(self, text, *args, **kwargs)
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        die()

    Path.write_text = torn_write


if __name__ == "__main__":
    point, k, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if point == "entry":
        cache.FLUSH_SECONDS = 0  # the remembered hashes are saved after every entry: they must survive the kill
        kill_in_entry_write(k)
    elif point == "hashes":
        cache.FLUSH_SECONDS = float("inf")  # the only write of content_hashes.json is the end-of-run one
        kill_in_hashes_write()
    else:
        raise SystemExit(f"unknown kill point {point!r} (entry | hashes)")
    sys.argv = [str(ROOT / "train.py"), *overrides]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
