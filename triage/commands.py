"""The plain function behind `hotline triage` (evaluation: triage/evaluation.py; benchmark: triage/bench.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import IO

from triage.pipeline import Triager


def _texts(lines: Iterable[str]) -> Iterable[str]:
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                yield str(json.loads(line).get("text", ""))
                continue
            except ValueError:
                pass
        yield line


def triage_stream(triager: Triager, inp: IO[str], out: IO[str], batch: int = 32) -> int:
    """One message per line (or JSON lines with "text") in, one contract JSON object per line out."""
    n, buf = 0, []
    for text in _texts(inp):
        buf.append(text)
        if len(buf) >= batch:
            n += _flush(triager, buf, out)
            buf = []
    if buf:
        n += _flush(triager, buf, out)
    return n


def _flush(triager: Triager, texts: list[str], out: IO[str]) -> int:
    for r in triager.triage_many(texts):
        out.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    out.flush()
    return len(texts)


def main_stream() -> int:  # pragma: no cover - wired to the CLI
    return triage_stream(Triager.load(), sys.stdin, sys.stdout)
