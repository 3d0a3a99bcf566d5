"""Prints one summary table from the JSON files that suites wrote (``python -m benchmarks.summarize``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.harness import format_table

# The columns worth reading at a glance; each row keeps those it has.
KEY_COLUMNS = ("name", "ok", "median_ms", "jaxla_ms", "anchor_ms", "speedup", "tflops", "gflops",
               "frac_of_matmul_ceiling", "compile_s", "max_abs_err")


def _key_column(name: str) -> bool:
    return name in KEY_COLUMNS or name.endswith("_ms") or name.startswith("speedup")


def summarize(paths: list[str]) -> str:
    blocks = []
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            blocks.append(f"# {path}: unreadable ({e})")
            continue
        info = payload.get("machine", {})
        rows = [{k: v for k, v in r.items() if _key_column(k)} for r in payload.get("rows", [])]
        blocks.append(f"# {payload.get('suite', path)} — {info.get('device')} x{info.get('device_count')}, "
                      f"jax {info.get('jax')}, {info.get('date')}")
        blocks.append(format_table(rows))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    print(summarize([p for p in sys.argv[1:] if Path(p).exists()]))
