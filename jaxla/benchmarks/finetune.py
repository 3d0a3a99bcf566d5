"""``finetune`` suite: the configured demos' speed — steps/s, compile vs run, and fresh-process wall.

Each demo runs twice:

- in this process through :func:`jaxla.finetune.run_finetune`, reporting per phase the compile time
  of the jitted step (lower + compile), the training-loop time and steps/s;
- as ``python -m jaxla finetune CONFIG`` in a fresh process, timing the whole command (Python and
  JAX start-up, every compile, training, evaluation, plots): the quantity the issue's targets are
  about (default demo < 60 s, tiny LM < 5 min, MiniLM sentiment < 2 min on 2 CPU cores).

``--quick`` runs both demos at toy sizes with ``run.fast_compile`` (and only the default demo as a
fresh process) to validate the suite, not to measure it.

The real-data demos ``minilm_sentiment`` (all-MiniLM-L6-v2 on VADER movie snippets, < 2 min) and
``smollm2_sentiment`` (QLoRA on SmolLM2-135M-Instruct, Q4_1 base, < 6 min) run only in a full run,
in-process and as a fresh process, and only when their files are downloaded (``jaxla download
all-minilm-l6-v2 smollm2-135m-instruct vader-sentiment``); otherwise their rows say they were
skipped and why.

Configs: the default demo is jaxla's built-in default config (the same as ``configs/lowrank.toml``);
the tiny LM demo runs its built-in config ``tiny_lm`` (``jaxla/finetune/demos/tiny_lm.toml``), so
both run from an installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jaxla
from jaxla import finetune
from jaxla.benchmarks import harness, specs_finetune

# The folder holding the imported jaxla package: the source checkout, or site-packages when installed.
PACKAGE_ROOT = Path(jaxla.__file__).resolve().parent.parent


def demo_config_path(demo: str) -> str | None:
    """The config a demo runs with: None for the built-in default demo (``lowrank``), else the name
    of its built-in config (shipped inside the package, so it works from an installed jaxla)."""
    if demo == finetune.Config().run.demo:
        return None
    if demo not in finetune.builtin_configs():
        raise FileNotFoundError(f"no built-in config {demo!r}; built-in: {finetune.builtin_configs()}")
    return demo


def _in_process(name: str, config: str | None, overrides: list[str], *, check: bool) -> list[dict]:
    cfg = finetune.apply_overrides(finetune.load_config(config), [*overrides, "run.plots=false"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = finetune.run_finetune(cfg, out=Path(tmp) / "run", progress=False,
                                        echo=lambda s: None)
        wall = time.perf_counter() - t0
    m = summary["metrics"]
    phases = m.get("phases") or {"adapt": {k: m[k] for k in ("steps", "compile_s", "run_s",
                                                               "steps_per_s")}}
    rows = []
    for phase, p in phases.items():
        rows.append({
            "name": f"{name} {phase} (in-process)",
            "steps": p["steps"],
            "compile_s": p["compile_s"],
            "run_s": p["run_s"],
            "steps_per_s": p["steps_per_s"],
            "ms_per_step": 1e3 * p["run_s"] / p["steps"] if p["steps"] else None,
        })
    if "relative_error" in m:
        quality = {"rel_err": m["relative_error"]}
    elif "accuracy_adapted" in m:
        quality = {"accuracy_adapted": m["accuracy_adapted"],
                   "accuracy_zero_shot": m["accuracy_zero_shot"],
                   "train_tokens_per_s": m["train_tokens_per_s"]}
        if check:  # the adapted model must beat the frozen model's zero-shot accuracy
            quality["ok"] = bool(m["accuracy_adapted"] > m["accuracy_zero_shot"])
    elif "pearson_r_lora" in m:
        quality = {"pearson_r_lora": m["pearson_r_lora"], "pearson_r_probe": m["pearson_r_probe"]}
        if check:  # the LoRA model must beat the linear probe
            quality["ok"] = bool(m["pearson_r_lora"] > m["pearson_r_probe"])
    else:
        quality = {"adapted_exact": m["accuracy"][f"LoRA-adapted/{cfg.tiny_lm.adapt_task}"]["exact"]}
    if check and "rel_err" in quality:  # the full default demo must actually recover ΔW*
        quality["ok"] = bool(quality["rel_err"] < 0.05)
    rows.append({"name": f"{name} whole run (in-process)", "wall_s": wall, **quality})
    return rows


def _fresh_process(name: str, config: str | None, overrides: list[str], target_s: float | None) -> dict:
    args = [sys.executable, "-m", "jaxla", "finetune", *([config] if config else []), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    # The child imports the same jaxla as this process, installed or from a checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([*args, "--out", str(Path(tmp) / "run")], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
    # "ok" (checked by the harness) means the command succeeded; meeting the time target is
    # reported apart, since it depends on the machine.
    row = {"name": f"{name} fresh process", "wall_s": wall, "ok": proc.returncode == 0}
    if target_s is not None:
        row["target_s"] = target_s
        row["met_target"] = wall < target_s
    return row


def run(*, quick: bool) -> list[dict]:
    lowrank = specs_finetune.QUICK_LOWRANK if quick else specs_finetune.FULL_LOWRANK
    tiny = specs_finetune.QUICK_TINY_LM if quick else specs_finetune.FULL_TINY_LM
    lowrank_cfg = demo_config_path("lowrank")
    try:
        tiny_cfg = demo_config_path("tiny_lm")
    except FileNotFoundError as e:
        tiny_cfg, tiny_missing = None, str(e)
    rows = []
    rows += _in_process("lowrank", lowrank_cfg, lowrank, check=not quick)
    if tiny_cfg is not None:
        rows += _in_process("tiny_lm", tiny_cfg, tiny, check=not quick)
    else:
        rows.append({"name": "tiny_lm (not run)", "skipped": tiny_missing})
    rows.append(_fresh_process("lowrank", lowrank_cfg, lowrank,
                               None if quick else specs_finetune.TARGET_LOWRANK_S))
    if not quick and tiny_cfg is not None:  # --quick already runs the tiny LM in-process
        rows.append(_fresh_process("tiny_lm", tiny_cfg, tiny, specs_finetune.TARGET_TINY_LM_S))
    if not quick:
        rows += _minilm_rows()
        rows += _smollm2_rows()
    return rows


def _real_demo_rows(name: str, missing: str | None, overrides: list[str],
                    target_s: float) -> list[dict]:
    """A real-data demo, in-process and as a fresh process, when its files are downloaded."""
    if missing:
        return [{"name": f"{name} (not run)", "skipped": missing}]
    cfg = demo_config_path(name)
    return [*_in_process(name, cfg, overrides, check=True),
            _fresh_process(name, cfg, overrides, target_s)]


def _minilm_rows() -> list[dict]:
    """The MiniLM demo."""
    return _real_demo_rows("minilm_sentiment", minilm_missing_files(), specs_finetune.FULL_MINILM,
                           specs_finetune.TARGET_MINILM_S)


def _smollm2_rows() -> list[dict]:
    """The QLoRA demo."""
    return _real_demo_rows("smollm2_sentiment", smollm2_missing_files(),
                           specs_finetune.FULL_SMOLLM2, specs_finetune.TARGET_SMOLLM2_S)


def smollm2_missing_files() -> str | None:
    """Why the SmolLM2 demo cannot run here (its model or data is not downloaded), or None."""
    return _missing_files(("smollm2-135m-instruct", "vader-sentiment"))


def minilm_missing_files() -> str | None:
    """Why the MiniLM demo cannot run here (its model or data is not downloaded), or None."""
    return _missing_files(("all-minilm-l6-v2", "vader-sentiment"))


def _missing_files(names: tuple[str, ...]) -> str | None:
    from jaxla.models import _download

    for what in names:
        try:
            _download.resolve(what)
        except FileNotFoundError as e:
            return str(e)
    return None


if __name__ == "__main__":
    sys.exit(harness.main("finetune", run))
