"""The run directory: atomic files, checkpoints and the metrics log.

Layout of a run directory::

    config.toml, config.json   the resolved config (written first, atomically)
    metrics.jsonl              one JSON line per step: phase, step, loss, lr, grad_norm, rate
    checkpoints/<phase>/step_XXXXXXXX.npz
    adapter.safetensors, adapter.json, summary.json, *.png

Every file is written to a temporary file in the same directory and renamed into place, so a run
killed at any moment leaves either the old or the new version of each file, never a torn one. A
checkpoint holds the leaves of the training state (parameters being trained plus optimizer state)
bit for bit, the step, and the config fingerprint it belongs to.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxla import _files
from jaxla.finetune import _config

__all__ = [
    "RunError",
    "latest_checkpoint",
    "load_checkpoint",
    "prepare_run_dir",
    "save_checkpoint",
]

_META = "__meta__"


from jaxla.finetune._errors import RunError  # noqa: E402  (one error module for the package)


def default_out_dir(cfg: _config.Config, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``: a fresh directory per run."""
    return Path(root) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run_dir(cfg: _config.Config, root: str | Path = "runs") -> Path | None:
    """The newest ``runs/<name>-*`` directory holding a config, for ``--resume`` without ``--out``."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted(p for p in root.glob(f"{cfg.run.name}-*") if (p / "config.json").is_file())
    return candidates[-1] if candidates else None


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k, '(absent)')!r} in the checkpoint, {current.get(k, '(absent)')!r} now"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


def prepare_run_dir(out: Path, cfg: _config.Config, *, resume: bool) -> None:
    """Checks (and for a new run creates) the run directory; raises :class:`RunError` on problems.

    Nothing is written unless every check passes. A new run needs a directory that is absent or holds
    no run; ``resume`` needs one holding a checkpoint written by the same config (same fingerprint).
    """
    config_json = out / "config.json"
    if resume:
        if not config_json.is_file() or not any((out / "checkpoints").glob("*/step_*.npz")):
            raise RunError(
                f"--resume: {str(out)!r} holds no checkpoint to resume from. Start a new run without "
                "--resume, or point --out at the directory of the run to continue."
            )
        try:
            saved = json.loads(config_json.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"--resume: cannot read {str(config_json)!r}: {e}.") from None
        if saved.get("fingerprint") != _config.config_fingerprint(cfg):
            diffs = _differences(saved.get("numeric", {}), _config.numeric_dict(cfg))
            raise RunError(
                f"--resume: the checkpoint in {str(out)!r} was written by a different config ("
                + ("; ".join(diffs) if diffs else "fingerprint mismatch")
                + "). Resume with the same config and overrides, or start a new run elsewhere."
            )
        return
    if config_json.exists() or (out / "checkpoints").exists():
        raise RunError(
            f"output directory {str(out)!r} already holds a run. Pass --resume to continue it, or "
            "choose another --out."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".probe.", delete=True)
        probe.close()
    except OSError as e:
        raise RunError(
            f"output directory {str(out)!r} is not writable ({e.strerror or e}). Choose another "
            "--out or fix its permissions."
        ) from None
    payload = {
        "fingerprint": _config.config_fingerprint(cfg),
        "numeric": _config.numeric_dict(cfg),
        "config": _config.config_to_dict(cfg),
    }
    _files.write_atomic_text(out / "config.toml", _config.config_to_toml(cfg))
    _files.write_atomic_text(out / "config.json", json.dumps(payload, indent=2) + "\n")


def to_host(tree: Any) -> Any:
    """NumPy copies of every array in ``tree``, gathering shards held by other hosts if needed."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def _step_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.npz"


def save_checkpoint(
    directory: Path, step: int, state: Any, *, fingerprint: str, keep: int
) -> Path:
    """Writes ``state`` (a pytree of arrays) at ``step`` atomically and prunes all but ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    arrays = {f"leaf_{i:05d}": x for i, x in enumerate(to_host(leaves))}
    meta = {"step": step, "fingerprint": fingerprint, "treedef": str(treedef)}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = _step_path(directory, step)
    _files.write_atomic(path, buf.getvalue())
    for old in sorted(directory.glob("step_*.npz"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or None."""
    found = sorted(directory.glob("step_*.npz")) if directory.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, template: Any, *, fingerprint: str) -> tuple[int, Any]:
    """Reads a checkpoint into the structure of ``template``; returns ``(step, state)``.

    ``template`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).

    Raises :class:`RunError` when the file is unreadable, from another config, or does not match the
    template's structure, shapes or dtypes.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data[_META]).decode())
            arrays = {k: data[k] for k in data.files if k != _META}
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"checkpoint {str(path)!r} cannot be read: {e}.") from None
    if meta.get("fingerprint") != fingerprint:
        raise RunError(
            f"checkpoint {str(path)!r} was written by a different config (fingerprint "
            f"{meta.get('fingerprint')} vs {fingerprint}). Resume with the config it was written by."
        )
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(arrays) != len(leaves) or meta.get("treedef") != str(treedef):
        raise RunError(
            f"checkpoint {str(path)!r} holds {len(arrays)} arrays with structure {meta.get('treedef')}"
            f", expected {len(leaves)} with structure {treedef}."
        )
    restored = []
    for i, ref in enumerate(leaves):
        arr = arrays[f"leaf_{i:05d}"]
        want = np.dtype(ref.dtype)
        if arr.shape != tuple(np.shape(ref)) or arr.dtype != want:
            raise RunError(
                f"checkpoint {str(path)!r} leaf {i} has shape {arr.shape} and dtype {arr.dtype}, "
                f"expected {tuple(np.shape(ref))} and {want}."
            )
        restored.append(arr)
    return int(meta["step"]), jax.tree_util.tree_unflatten(treedef, restored)


class MetricsLog:
    """Append-only ``metrics.jsonl`` that, on resume, forgets steps after the restored checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        """Every complete line (a torn last line from a killed run is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def rewind(self, phase: str, step: int) -> None:
        """Drops records of ``phase`` with ``step >= step`` (they will be recomputed)."""
        kept = [r for r in self.records() if not (r.get("phase") == phase and r["step"] >= step)]
        _files.write_atomic_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
