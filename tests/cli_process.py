"""Test helper: a fine-tune demo run by the CLI in a child process and killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kill_at_first_checkpoint(config: Path, overrides: Iterable[str], out: Path, *,
                             phase: str = "adapt", timeout_s: float = 240.0) -> None:
    """``python -m jaxla finetune CONFIG --set O ... --out OUT`` in a child process, SIGKILLed as
    soon as the first checkpoint of ``phase`` is on disk; asserts it died by the signal and left
    no final adapter behind."""
    args = [sys.executable, "-m", "jaxla", "finetune", str(config), "--no-progress", "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while not list((out / "checkpoints" / phase).glob("step_*.npz")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, f"no checkpoint within {timeout_s:.0f} s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter.safetensors").exists()
