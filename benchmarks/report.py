"""What every benchmark script does with its table: print it, and write it to `out` when given (the
tables kept in benchmarks/results/)."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, out: str | None) -> None:
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
