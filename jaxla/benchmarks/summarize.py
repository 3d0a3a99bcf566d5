"""``summarize`` tool: one table of the key columns from the JSON files that suites wrote.

    jaxla bench summarize [PATH ...]        # or: python -m jaxla.benchmarks.summarize [PATH ...]

Each PATH is a results file (``jaxla bench SUITE --json FILE``) or a folder whose ``*.json`` files are
read in name order. Without PATH it reads ``benchmarks/results`` under the current directory (the
recorded results of a source checkout). Files are validated by :func:`harness.read_results`; a bad
one is an error naming it, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxla.benchmarks.harness import BenchInputError, format_table, read_results

__all__ = ["DEFAULT_RESULTS", "KEY_COLUMNS", "USAGE", "main", "result_files", "run_tool", "summarize"]

USAGE = "jaxla bench summarize [PATH ...]"
DEFAULT_RESULTS = Path("benchmarks") / "results"

# The columns worth reading at a glance; each row keeps those it has.
KEY_COLUMNS = ("name", "causal", "impl", "ok", "ms", "median_ms", "jaxla_ms", "anchor_ms", "speedup",
               "tflops", "gflops", "frac_of_matmul_ceiling", "frac_of_bf16_matmul_ceiling", "steps_per_s",
               "wall_s", "compile_s",
               "max_abs_err")


def _key_column(name: str) -> bool:
    return (name in KEY_COLUMNS or name.endswith(("_ms", "_tflops"))
            or name.startswith(("speedup", "ratio_")))


def result_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expands folders to their ``*.json`` files; no paths means :data:`DEFAULT_RESULTS`.

    Raises:
      BenchInputError: a path that does not exist, a folder without JSON files, or no paths and no
        ``benchmarks/results`` folder here.
    """
    if not paths:
        if not DEFAULT_RESULTS.is_dir():
            raise BenchInputError(
                f"summarize needs result files: give JSON files written by 'jaxla bench SUITE --json "
                f"FILE' or folders holding them (without PATH it reads {str(DEFAULT_RESULTS)!r} in "
                f"the current directory, which {str(Path.cwd())!r} does not have).")
        paths = [DEFAULT_RESULTS]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.json") if p.is_file())
            if not found:
                raise BenchInputError(f"summarize: folder {str(path)!r} holds no *.json result files.")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise BenchInputError(f"summarize: {str(path)!r} does not exist.")
    return files


def summarize(paths: Sequence[str | Path]) -> str:
    """One block per results file: a header (suite, device, jax, date) and the key columns.

    Raises:
      BenchInputError: see :func:`result_files`; ``ResultsFileError`` (a subclass) for a file that is
        not a results file.
    """
    blocks = []
    for path in result_files(paths):
        payload = read_results(path)
        info = payload["machine"]
        rows = [{k: v for k, v in r.items() if _key_column(k)} for r in payload["rows"]]
        blocks.append(f"# {payload['suite']} — {info.get('device')} x{info.get('device_count')}, "
                      f"jax {info.get('jax')}, {info.get('date')}  ({path})")
        blocks.append(format_table(rows))
    return "\n\n".join(blocks)


def run_tool(paths: Sequence[str]) -> str:
    """``jaxla bench summarize [PATH ...]``: the text to print (raises BenchInputError)."""
    return summarize(paths)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxla.benchmarks.summarize``: 0, or 2 with one line on stderr for bad input."""
    parser = argparse.ArgumentParser(prog="python -m jaxla.benchmarks.summarize",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", metavar="PATH", help="results JSON file or folder")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.paths))
    except BenchInputError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
