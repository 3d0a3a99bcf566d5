"""The ``jaxla`` command (also ``python -m jaxla``): ``finetune`` demos and ``bench`` suites.

Exit status: 0 success; 2 a problem with the command line, config, run directory or devices (one
paragraph on stderr, no traceback, nothing written); 3 the loss became NaN/inf (the last good
checkpoint is kept); 130 interrupted by Ctrl-C (a checkpoint was saved; rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130

_FINETUNE_HELP = """\
Runs a configured fine-tune demo and prints a summary table.

Without CONFIG it runs the default demo (configs/lowrank.toml: LoRA with r = 8 recovers a rank-8
update of a frozen 768 x 3072 matrix). Other shipped configs: configs/tiny_lm.toml (a tiny
transformer pretrained on one task and LoRA-adapted to another), configs/lowrank_mesh.toml and
configs/tiny_lm_mesh.toml (the same on a data x model device mesh).

Outputs in the run directory: config.toml/config.json (resolved config), metrics.jsonl, checkpoints/,
adapter.safetensors, summary.json, and loss/singular-value PNGs when matplotlib is installed.
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxla",
        description="jaxla: the linear algebra at the heart of LLMs, as pure JAX functions.",
        epilog="Run 'jaxla finetune --help' or 'jaxla bench --help' for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    ft = sub.add_parser(
        "finetune",
        help="run a configured fine-tune demo (default: the low-rank LoRA demo)",
        description=_FINETUNE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ft.add_argument("config", nargs="?", metavar="CONFIG",
                    help="TOML config file (default: the built-in lowrank demo)")
    ft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set lora.rank=4 --set train.steps=100 "
                         "(repeatable; the value is converted to the key's type)")
    ft.add_argument("--out", metavar="DIR",
                    help="run directory (default: runs/<run.name>-<timestamp>; with --resume, the "
                         "newest runs/<run.name>-* directory)")
    ft.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its latest checkpoint (same config and "
                         "overrides required); ends bitwise equal to an uninterrupted run")
    ft.add_argument("--print-config", action="store_true",
                    help="print the resolved config as TOML and exit without running")
    ft.add_argument("--no-progress", action="store_true",
                    help="plain log lines instead of a progress bar even on a terminal")
    ft.add_argument("--cpu-devices", type=int, metavar="N",
                    help="simulate N CPU devices (sets XLA_FLAGS before JAX starts) to try the "
                         "mesh configs on one machine")

    bench = sub.add_parser(
        "bench",
        help="run a benchmark suite from the repository's benchmarks/ folder",
        description="Runs benchmarks/SUITE.py of the jaxla source checkout (e.g. 'jaxla bench "
                    "finetune --quick') and prints its table.",
    )
    bench.add_argument("suite", metavar="SUITE", help="suite name, e.g. finetune, linear, lora")
    bench.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    return parser


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    text = textwrap.fill(str(message), width=100, break_long_words=False, break_on_hyphens=False)
    print(f"jaxla: error: {text}", file=sys.stderr)
    return code


def _set_cpu_devices(n: int) -> str | None:
    if n < 1:
        return f"--cpu-devices must be >= 1, got {n}."
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])
    return None


def _finetune(args: argparse.Namespace) -> int:
    if args.cpu_devices is not None:
        problem = _set_cpu_devices(args.cpu_devices)
        if problem:
            return _fail(problem)
    from jaxla import finetune

    try:
        cfg = finetune.apply_overrides(finetune.load_config(args.config), args.overrides)
    except finetune.ConfigError as e:
        return _fail(e)
    if args.print_config:
        print(finetune.config_to_toml(cfg), end="")
        return 0
    try:
        summary = finetune.run_finetune(
            cfg, out=args.out, resume=args.resume, progress=False if args.no_progress else None
        )
    except (finetune.ConfigError, finetune.RunError) as e:
        return _fail(e)
    except finetune.NonFiniteLossError as e:
        return _fail(e, EXIT_NONFINITE)
    print(finetune.format_summary(summary))
    if summary["interrupted"]:
        print(f"interrupted: checkpoint saved; continue with --out {summary['out']} --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "harness.py").is_file():
        return _fail(
            f"no benchmarks/ folder next to the jaxla package (looked in {root}). Benchmarks ship "
            "with the source checkout: clone the repository and install it with pip install -e ."
        )
    if not args.suite.isidentifier():
        return _fail(f"suite name {args.suite!r} is not a module name (e.g. finetune, linear).")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if not (root / "benchmarks" / f"{args.suite}.py").is_file():
        available = sorted(p.stem for p in (root / "benchmarks").glob("*.py")
                           if not p.stem.startswith(("_", "specs_")) and p.stem != "harness")
        return _fail(f"no benchmark suite {args.suite!r}; available: {', '.join(available)}.")
    harness = importlib.import_module("benchmarks.harness")
    module = importlib.import_module(f"benchmarks.{args.suite}")
    argv = (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
    return int(harness.main(args.suite, module.run, argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxla`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "finetune":
        return _finetune(args)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
