"""Write a benchmark's figures into its own section of benchmarks/README.md (atomically)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from dsire.atomic import atomic_write_text

README = Path(__file__).resolve().parent / "README.md"


def command_line() -> str:
    """How the running benchmark was invoked (`python -m benchmarks.<name> <args>`), for its section."""
    return " ".join([f"python -m benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


def write_section(name: str, markdown: str, readme: Path = README) -> None:
    """Replace (or append) the block between `<!-- name:begin -->` and `<!-- name:end -->`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    atomic_write_text(readme, text)
