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
        help="run a benchmark suite, or summarize/plot recorded results",
        description=_bench_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("suite", nargs="?", metavar="SUITE", help="a suite or tool name (listed above)")
    bench.add_argument("paths", nargs="*", metavar="PATH",
                       help="tools only: summarize [PATH ...] (result files or folders), "
                            "plot_attention JSON PNG")
    bench.add_argument("--quick", action="store_true", help="suites: tiny shapes, a few seconds")
    bench.add_argument("--json", metavar="FILE",
                       help="suites: also write the results as JSON to FILE (its folder must exist "
                            "and be writable; checked before the suite runs, written atomically)")
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


def _bench_help() -> str:
    from jaxla import benchmarks

    width = max(len(e.name) for e in (*benchmarks.SUITES, *benchmarks.TOOLS))
    suites = "\n".join(f"  {e.name:<{width}}  {e.summary}" for e in benchmarks.SUITES)
    tools = "\n".join(f"  {e.name:<{width}}  {e.summary}" for e in benchmarks.TOOLS)
    return (
        "Runs a benchmark suite from the installed jaxla package and prints its table, e.g.\n"
        "'jaxla bench linear --quick --json /tmp/linear.json'; or reads recorded results.\n\n"
        f"suites (jaxla bench SUITE [--quick] [--json FILE]):\n{suites}\n\n"
        f"tools (jaxla bench TOOL PATH ...):\n{tools}\n\n"
        "Exit status: 0 success; 1 a suite's numerics check failed (named on stderr); 2 a bad name,\n"
        "path or option (one paragraph, found before anything runs), or the JSON could not be\n"
        "written at the end; 130 interrupted."
    )


def _bench(args: argparse.Namespace) -> int:
    from jaxla import benchmarks

    entry = None if args.suite is None else benchmarks.find(args.suite)
    if entry is None:
        which = "name a suite or tool" if args.suite is None else (
            f"no benchmark suite or tool {args.suite!r}")
        return _fail(
            f"{which}; available suites: {', '.join(e.name for e in benchmarks.SUITES)}; tools: "
            f"{', '.join(e.name for e in benchmarks.TOOLS)} ('jaxla bench --help' describes each).")
    from jaxla.benchmarks import harness

    try:
        if entry in benchmarks.TOOLS:
            return _bench_tool(entry.name, args)
        if args.paths:
            return _fail(f"suite {entry.name!r} takes no PATH arguments (got {' '.join(args.paths)}); "
                         "its options are --quick and --json FILE.")
        if args.json is not None and (problem := harness.output_path_problem(args.json)):
            return _fail(problem)
        module = importlib.import_module(f"jaxla.benchmarks.{entry.name}")
        argv = (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
        return int(harness.main(entry.name, module.run, argv) or 0)
    except harness.BenchInputError as e:
        return _fail(e)
    except KeyboardInterrupt:
        return _fail(f"bench {entry.name} interrupted; nothing was written.", EXIT_INTERRUPTED)


def _bench_tool(name: str, args: argparse.Namespace) -> int:
    tool = importlib.import_module(f"jaxla.benchmarks.{name}")
    if args.quick or args.json is not None:
        return _fail(f"{name} is a tool, not a suite: it takes no --quick or --json ({tool.USAGE}).")
    print(tool.run_tool(args.paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxla`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "finetune":
        return _finetune(args)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
