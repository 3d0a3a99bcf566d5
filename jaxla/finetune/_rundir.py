"""The run directory: atomic files, verified checkpoints, resume and the metrics log.

Layout of a run directory::

    config.toml, config.json   the config the run continues with (written first, atomically)
    metrics.jsonl              one JSON line per step: phase, step, loss, lr, grad_norm, rate
    resume.jsonl               one JSON line per --resume: when, from which steps, what changed
    checkpoints/<phase>/step_XXXXXXXX.npz
    adapter.safetensors, adapter.json, summary.json, *.png

Every file is written to a temporary file in the same directory and renamed into place, so a run
killed at any moment leaves either the old or the new version of each file, never a torn one. A
checkpoint is a zip of uncompressed ``.npy`` members (an ``.npz`` NumPy reads too): the leaves of
the training state bit for bit, and a JSON ``__meta__`` member with the step, the fingerprint of the
config that wrote it, the state's tree structure, and the shape, dtype and SHA-256 of every leaf.
Checkpoints are read without pickle and verified member by member (the zip's CRC-32 and the
SHA-256s), so a truncated, emptied or bit-flipped file is recognised as damaged.

Resume (:func:`prepare_run_dir` with ``resume=True``) needs the run's ``config.json`` and the same
config, except for the optimizer hyperparameters in :data:`RESUME_ADJUSTABLE`, which may change
when the optimizer state's structure does not (see :func:`structural_change`). Damaged checkpoints
are moved aside (``step_X.npz.damaged``) and the phase resumes from its newest intact one, or from
step 0 when none is left, as it does for a run killed before its first checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import re
import struct
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from jaxla import _files
from jaxla.finetune import _config

if TYPE_CHECKING:  # the loader imports the demos, which import this module
    from jaxla.finetune._loader import Config

__all__ = [
    "RESUME_ADJUSTABLE",
    "ResumeRecord",
    "RunError",
    "RunWarning",
    "RunWriteError",
    "checkpoint_fingerprint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "nonfinite_advice",
    "prepare_run_dir",
    "save_checkpoint",
    "structural_change",
    "verify_checkpoint",
]

_META = "__meta__"


from jaxla.finetune._errors import RunError  # noqa: E402  (one error module for the package)


class RunWriteError(RunError):
    """Writing a file of the run directory failed (disk full, permissions, I/O; CLI exit status 4).

    ``path`` is the file that could not be written. Files written before are intact (each is
    replaced atomically), so the run can continue with ``--resume`` once the cause is fixed.
    """

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


class RunWarning(UserWarning):
    """Something ``--resume`` did on its own: restarted from step 0, skipped a damaged checkpoint,
    or took changed optimizer settings. The CLI prints these on stderr as ``jaxla: warning:``."""


# Keys --resume may change: optimizer hyperparameters that the optimizer state's structure does not
# depend on (only their values enter the update), so every checkpoint stays loadable. A demo's own
# per-phase learning rates (fields marked ``learning_rate_of``) are adjustable too: see
# :func:`resume_adjustable`.
RESUME_ADJUSTABLE = frozenset({
    "optim.learning_rate",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.grad_clip",
    "optim.weight_decay",
})


def resume_adjustable(cfg: Config) -> frozenset[str]:
    """The keys ``--resume`` may change for ``cfg``: :data:`RESUME_ADJUSTABLE` plus the demo's
    per-phase learning rates."""
    return RESUME_ADJUSTABLE | frozenset(_config.phase_learning_rate_keys(cfg).values())


def structural_change(key: str, before: Any, after: Any) -> str | None:
    """Why changing ``key`` from ``before`` to ``after`` changes the optimizer state's structure.

    None when it does not. Gradient clipping adds a stage to the optimizer chain, so
    ``optim.grad_clip`` may change between positive values but not to or from 0; ``optim.optimizer``
    changes the state entirely (a test checks these rules against :func:`_runner.make_optimizer`).
    """
    if key == "optim.optimizer" and before != after:
        return (f"optim.optimizer {before!r} -> {after!r} gives the optimizer state another "
                "structure")
    if key == "optim.grad_clip" and _clips(before) != _clips(after):
        return (f"optim.grad_clip {before!r} -> {after!r} adds or removes the clipping stage of "
                "the optimizer (it may change between positive values)")
    return None


def _clips(grad_clip: Any) -> bool | None:
    """Whether a grad_clip value turns clipping on (None for a value that is not a number)."""
    if isinstance(grad_clip, int | float) and not isinstance(grad_clip, bool):
        return grad_clip > 0
    return None


def checkpoint_fingerprint(cfg: Config) -> str:
    """Hash of the keys a checkpoint's content depends on: :func:`_config.numeric_dict` without
    :data:`RESUME_ADJUSTABLE` (a checkpoint stays valid when they change), but with whether
    gradient clipping is on (it changes the state's structure)."""
    numeric = _config.numeric_dict(cfg)
    adjustable = resume_adjustable(cfg)
    kept = {k: v for k, v in numeric.items() if k not in adjustable}
    kept["optim.grad_clip > 0"] = cfg.optim.grad_clip > 0
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def default_out_dir(cfg: Config, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``: a fresh directory per run."""
    return Path(root) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run_dir(cfg: Config, root: str | Path = "runs") -> Path | None:
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


def _describe_os_error(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    reason = e.strerror or str(e) or type(e).__name__
    return f"{reason} ({name})" if name else reason


@contextlib.contextmanager
def _writing(path: Path, consequence: str) -> Iterator[None]:
    """Turns an OSError while writing ``path`` into a :class:`RunWriteError` naming it."""
    try:
        yield
    except OSError as e:
        advice = " Free some space on that disk." if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise RunWriteError(
            f"cannot write {str(path)!r}: {_describe_os_error(e)}.{advice} {consequence}", path
        ) from None


_AFTER_WRITE_FAILURE = (
    "Every file written before is intact (each is replaced atomically); once fixed, continue the "
    "run with the same command plus --resume."
)


def _config_payload(cfg: Config) -> dict[str, Any]:
    return {
        "fingerprint": _config.config_fingerprint(cfg),
        "numeric": _config.numeric_dict(cfg),
        "config": _config.config_to_dict(cfg),
    }


def _write_config(out: Path, cfg: Config, consequence: str) -> None:
    payload = _config_payload(cfg)
    with _writing(out / "config.toml", consequence):
        _files.write_atomic_text(out / "config.toml", _config.config_to_toml(cfg))
    with _writing(out / "config.json", consequence):
        _files.write_atomic_text(out / "config.json", json.dumps(payload, indent=2) + "\n")


class ResumeRecord(NamedTuple):
    """What :func:`prepare_run_dir` did for a resume (also one line of ``resume.jsonl``).

    ``from_steps``: phase -> step of the checkpoint it resumes from (phases not listed start at
    step 0); ``changed``: key -> (value before, value now) of the adjusted optimizer settings;
    ``damaged``: ``(checkpoint, reason)`` of every checkpoint moved aside.
    """

    from_steps: dict[str, int]
    changed: dict[str, tuple[Any, Any]]
    damaged: tuple[tuple[str, str], ...]


def _warn(message: str) -> None:
    warnings.warn(message, RunWarning, stacklevel=3)


def prepare_run_dir(out: Path, cfg: Config, *, resume: bool) -> ResumeRecord | None:
    """Checks (and for a new run creates) the run directory; raises :class:`RunError` on problems.

    A new run needs a directory that is absent or holds no run; nothing is written unless every
    check passes, and a failed write removes what this call created (:class:`RunWriteError`).

    ``resume`` needs the run's ``config.json`` and the same config, except that the keys in
    :data:`RESUME_ADJUSTABLE` may change unless :func:`structural_change` objects; the change is
    recorded in ``resume.jsonl`` and ``config.toml``/``config.json`` are rewritten to the config
    the run continues with. Each phase's checkpoints are verified newest first: damaged ones are
    renamed to ``step_X.npz.damaged`` (with a :class:`RunWarning`) so the phase resumes from its
    newest intact checkpoint; a run with no intact checkpoint restarts from step 0 (with a
    :class:`RunWarning`). Temporary files of checkpoint writes cut short by a kill are removed.

    Returns:
      A :class:`ResumeRecord` for a resume, None for a new run.
    """
    config_json = out / "config.json"
    if resume:
        return _prepare_resume(out, cfg)
    if config_json.exists() or (out / "checkpoints").exists():
        raise RunError(
            f"output directory {str(out)!r} already holds a run. Pass --resume to continue it, or "
            "choose another --out."
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".probe.", delete=True)
        probe.close()
    except OSError as e:
        raise RunError(
            f"output directory {str(out)!r} is not writable ({e.strerror or e}). Choose another "
            "--out or fix its permissions."
        ) from None
    try:
        _write_config(out, cfg, "Nothing was written.")
    except RunWriteError:
        (out / "config.toml").unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return None


def _read_saved_config(config_json: Path) -> dict[str, Any]:
    try:
        saved = json.loads(config_json.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"--resume: cannot read {str(config_json)!r}: {e}.") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("fingerprint"), str)
            and isinstance(saved.get("numeric"), dict)):
        raise RunError(
            f"--resume: {str(config_json)!r} is not a jaxla run config (expected an object with "
            "'fingerprint' and 'numeric'). Point --out at the directory of the run to continue."
        )
    return saved


def _resume_changes(out: Path, saved: dict[str, Any], cfg: Config) -> dict[str, tuple]:
    """The adjustable keys that differ from the run's config; RunError for any other difference."""
    if saved["fingerprint"] == _config.config_fingerprint(cfg):
        return {}
    before, now = saved["numeric"], _config.numeric_dict(cfg)
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)}
    problems = {k: p for k, (a, b) in changed.items() if (p := structural_change(k, a, b))}
    adjustable = resume_adjustable(cfg)
    fixed = [k for k in changed if k not in adjustable and k not in problems]
    if fixed or not changed:
        diffs = _differences({k: before.get(k) for k in fixed}, {k: now.get(k) for k in fixed})
        raise RunError(
            f"--resume: the checkpoint in {str(out)!r} was written by a different config ("
            + ("; ".join(diffs) if diffs else "fingerprint mismatch")
            + "). Resume with the same config and overrides (only the optimizer settings "
            + ", ".join(sorted(adjustable)) + " may change), or start a new run elsewhere."
        )
    if problems:
        raise RunError(
            f"--resume: cannot change the optimizer of the run in {str(out)!r}: "
            + "; ".join(problems.values()) + ", so its checkpoints would not load. Keep the run's "
            "value, or start a new run elsewhere."
        )
    return changed


_STEP_FILE = re.compile(r"step_(\d+)\.npz")
# The temporary file _files.write_atomic writes a checkpoint to before renaming it into place.
_LEFTOVER = re.compile(r"\.step_\d+\.npz\.[A-Za-z0-9_]+\.tmp")


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_X.npz`` in ``directory``, by increasing step."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_FILE.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _quarantine(path: Path) -> Path:
    """Renames a damaged checkpoint out of the way (kept for inspection, never overwritten)."""
    target = path.with_name(path.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    with _writing(target, "Nothing else was changed."):
        path.rename(target)
    return target


def _newest_intact(directory: Path, fingerprint: str) -> tuple[int | None, list[tuple[Path, str]]]:
    """The step of the newest intact checkpoint (None if none) and the damaged ones newer than it.

    Raises RunError for an intact checkpoint of another config or a file that cannot be opened.
    """
    damaged = []
    for step, path in reversed(list_checkpoints(directory)):
        try:
            meta, _ = _read_checkpoint(path)
        except _Damaged as e:
            damaged.append((path, str(e)))
            continue
        except OSError as e:
            raise RunError(
                f"--resume: checkpoint {str(path)!r} cannot be read: {_describe_os_error(e)}."
            ) from None
        _check_fingerprint(path, meta, fingerprint)
        return step, damaged
    return None, damaged


def _check_fingerprint(path: Path, meta: dict[str, Any], fingerprint: str) -> None:
    if meta["fingerprint"] != fingerprint:
        raise RunError(
            f"checkpoint {str(path)!r} was written by a different config (fingerprint "
            f"{meta['fingerprint']} vs {fingerprint}). Resume with the config it was written by."
        )


def _prepare_resume(out: Path, cfg: Config) -> ResumeRecord:
    config_json = out / "config.json"
    if not config_json.is_file():
        raise RunError(
            f"--resume: {str(out)!r} holds no run (no config.json) and no checkpoint to resume "
            "from. Start a new run without --resume, or point --out at the directory of the run "
            "to continue."
        )
    changed = _resume_changes(out, _read_saved_config(config_json), cfg)
    fingerprint = checkpoint_fingerprint(cfg)
    # Verify every phase before changing anything: a checkpoint of another config is an error.
    phases: dict[str, tuple[int | None, list[tuple[Path, str]]]] = {}
    ckpt_root = out / "checkpoints"
    for phase_dir in sorted(ckpt_root.iterdir()) if ckpt_root.is_dir() else []:
        if phase_dir.is_dir():
            phases[phase_dir.name] = _newest_intact(phase_dir, fingerprint)

    consequence = "Nothing else was changed; fix the cause and resume again."
    if ckpt_root.is_dir():  # a run killed while writing a checkpoint leaves its temporary file
        for phase_dir in ckpt_root.iterdir():
            for leftover in phase_dir.glob(".step_*.npz.*.tmp") if phase_dir.is_dir() else ():
                if _LEFTOVER.fullmatch(leftover.name):
                    with _writing(leftover, consequence):
                        leftover.unlink(missing_ok=True)
    moved = []
    for phase, (intact, damaged) in phases.items():
        for path, reason in damaged:
            target = _quarantine(path)
            moved.append((str(path), reason))
            fallback = (f"the newest intact checkpoint, step {intact}" if intact is not None
                        else "step 0 (no intact checkpoint is left)")
            _warn(f"checkpoint {str(path)!r} is damaged ({reason}); moved it to "
                  f"{str(target.name)!r} and phase {phase!r} resumes from {fallback}.")
    from_steps = {p: s for p, (s, _) in phases.items() if s is not None}
    if not from_steps:
        why = "every checkpoint is damaged" if moved else "the run stopped before its first one"
        _warn(f"--resume: {str(out)!r} holds no intact checkpoint ({why}): restarting the run from "
              "step 0 with its config.")
    if changed:
        where = ", ".join(f"{p} step {s}" for p, s in from_steps.items()) or "step 0"
        _warn("--resume continues with changed optimizer settings ("
              + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
              + f") from {where}; recorded in {str(out / 'resume.jsonl')!r}.")
    record = ResumeRecord(from_steps, changed, tuple(moved))
    log = out / "resume.jsonl"
    line = json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "from_steps": from_steps,
        "changed": {k: {"before": a, "after": b} for k, (a, b) in changed.items()},
        "damaged": [{"checkpoint": p, "reason": r} for p, r in moved],
    })
    with _writing(log, consequence):
        previous = log.read_text() if log.is_file() else ""
        if previous and not previous.endswith("\n"):
            previous += "\n"
        _files.write_atomic_text(log, previous + line + "\n")
    if changed:
        _write_config(out, cfg, consequence)
    return record


def nonfinite_advice(cfg: Config, phase: str, out: Path) -> str:
    """How to continue after a NaN/inf stop in ``phase``: the exact ``--resume --set`` to use."""
    key = _config.phase_learning_rate_keys(cfg).get(phase, "optim.learning_rate")
    section, name = key.split(".")
    lower = getattr(getattr(cfg, section), name) / 10
    if cfg.optim.grad_clip > 0:
        other = f"lower optim.grad_clip than {cfg.optim.grad_clip:g} the same way"
    else:
        other = "start a new run with optim.grad_clip > 0"
    return (f"To continue with a lower learning rate, rerun the same command (--out {out}) with "
            f"--resume --set {key}={lower:.3g}: --resume accepts changed optimizer settings and "
            f"records them in resume.jsonl. Or {other}, or check the data.")


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


_FORMAT = 2
_MAX_META_BYTES = 64 << 20


def _write_member(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, array, allow_pickle=False)


def _checkpoint_bytes(step: int, leaves: list[np.ndarray], fingerprint: str, treedef) -> bytes:
    buf = io.BytesIO()
    entries = []
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, leaf in enumerate(leaves):
            leaf = np.asarray(leaf, order="C")
            entries.append({
                "shape": list(leaf.shape),
                "dtype": np.lib.format.dtype_to_descr(leaf.dtype),
                "sha256": hashlib.sha256(leaf.tobytes()).hexdigest(),
            })
            _write_member(zf, f"leaf_{i:05d}", leaf)
        meta = {"format": _FORMAT, "step": step, "fingerprint": fingerprint,
                "treedef": str(treedef), "leaves": entries}
        _write_member(zf, _META, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return buf.getvalue()


def save_checkpoint(
    directory: Path, step: int, state: Any, *, fingerprint: str, keep: int
) -> Path:
    """Writes ``state`` (a pytree of arrays) at ``step`` atomically and prunes all but ``keep``.

    ``fingerprint`` is the :func:`checkpoint_fingerprint` of the run's config.

    Raises:
      RunWriteError: the file could not be written (the previous checkpoints are untouched).
    """
    path = _step_path(directory, step)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    data = _checkpoint_bytes(step, to_host(leaves), fingerprint, treedef)
    with _writing(path, _AFTER_WRITE_FAILURE):
        directory.mkdir(parents=True, exist_ok=True)
        _files.write_atomic(path, data)
        for _, old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or None (not verified here)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


class _Damaged(Exception):
    """A checkpoint file that is not what :func:`save_checkpoint` wrote; the message says why."""


def _read_header(f, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise _Damaged(f"member {name!r} has .npy version {version}, expected 1.0 or 2.0")
    except ValueError as e:
        raise _Damaged(f"member {name!r} has no valid .npy header ({e})") from None
    if fortran or dtype.hasobject:
        raise _Damaged(f"member {name!r} holds a Fortran-ordered or object array")
    return shape, dtype


def _read_member(zf: zipfile.ZipFile, name: str, max_bytes: int | None = None) -> np.ndarray:
    """One ``.npy`` member, reading no more bytes than the member's recorded size."""
    try:
        info = zf.getinfo(f"{name}.npy")
    except KeyError:
        raise _Damaged(f"member {name!r} is missing") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Damaged(f"member {name!r} is compressed; checkpoints store members uncompressed")
    if max_bytes is not None and info.file_size > max_bytes:
        raise _Damaged(f"member {name!r} has {info.file_size} bytes, expected at most {max_bytes}")
    with zf.open(info) as f:
        shape, dtype = _read_header(f, name)
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes != info.file_size - f.tell():
            raise _Damaged(f"member {name!r} has a header for {nbytes} bytes of data but holds "
                           f"{info.file_size - f.tell()}")
        data = f.read(nbytes)
        if len(data) != nbytes or f.read(1):  # the final read also checks the member's CRC-32
            raise _Damaged(f"member {name!r} is shorter or longer than its header says")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def _valid_meta(meta: Any) -> bool:
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        return False
    leaves = meta.get("leaves")
    return (
        isinstance(meta.get("step"), int) and meta["step"] >= 0
        and isinstance(meta.get("fingerprint"), str) and isinstance(meta.get("treedef"), str)
        and isinstance(leaves, list)
        and all(isinstance(e, dict) and isinstance(e.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in e["shape"])
                and isinstance(e.get("dtype"), str) and isinstance(e.get("sha256"), str)
                for e in leaves)
    )


# What zipfile and the .npy header parser raise on corrupt bytes (a bad offset makes seek fail
# with OSError, an unknown compression method is NotImplementedError, an "encrypted" flag is
# RuntimeError, a truncated structure is EOFError or struct.error).
_CORRUPT = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
            OverflowError, struct.error)


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Reads and verifies a checkpoint (no pickle); raises :class:`_Damaged` on any inconsistency.

    An OSError opening the file (missing, permissions) passes through: that is not damage to it.
    """
    with open(path, "rb") as raw_file:
        try:
            meta, arrays = _read_zip(raw_file)
        except _CORRUPT as e:  # e.g. "Bad CRC-32 for file 'leaf_00003.npy'"
            reason = str(e) if isinstance(e, zipfile.BadZipFile) else f"{type(e).__name__}: {e}"
            raise _Damaged(reason) from None
    match = _STEP_FILE.fullmatch(path.name)
    if match and int(match.group(1)) != meta["step"]:
        raise _Damaged(f"its metadata says step {meta['step']}, its name step {match.group(1)}")
    return meta, arrays


def _read_zip(raw_file) -> tuple[dict[str, Any], list[np.ndarray]]:
    try:
        zf = zipfile.ZipFile(raw_file)
    except zipfile.BadZipFile as e:
        raise _Damaged(f"not a zip archive: {e}") from None
    with zf:
        raw = _read_member(zf, _META, _MAX_META_BYTES)
        try:
            meta = json.loads(raw.tobytes().decode("utf-8"))
        except ValueError as e:
            raise _Damaged(f"its metadata is not valid JSON ({e})") from None
        if not _valid_meta(meta):
            raise _Damaged("its metadata is not that of a jaxla checkpoint (format "
                           f"{meta.get('format') if isinstance(meta, dict) else None!r}, "
                           f"expected {_FORMAT})")
        names = {f"leaf_{i:05d}.npy" for i in range(len(meta["leaves"]))} | {f"{_META}.npy"}
        extra = sorted(set(zf.namelist()) - names)
        if extra:
            raise _Damaged(f"unexpected members {extra[:3]}")
        arrays = []
        for i, entry in enumerate(meta["leaves"]):
            name = f"leaf_{i:05d}"
            arr = _read_member(zf, name)
            if (list(arr.shape) != entry["shape"]
                    or np.lib.format.dtype_to_descr(arr.dtype) != entry["dtype"]):
                raise _Damaged(f"member {name!r} has shape {arr.shape} and dtype {arr.dtype}, "
                               f"its metadata says {tuple(entry['shape'])} and {entry['dtype']}")
            if hashlib.sha256(arr.tobytes()).hexdigest() != entry["sha256"]:
                raise _Damaged(f"member {name!r} fails its SHA-256 check")
            arrays.append(arr)
    return meta, arrays


def verify_checkpoint(path: Path) -> str | None:
    """None if ``path`` is an intact checkpoint, else why it is damaged (one phrase).

    Reads the whole file: every member's CRC-32, every leaf's SHA-256, the metadata's consistency.

    Raises:
      RunError: the file cannot be opened at all (permissions, I/O error).
    """
    try:
        _read_checkpoint(path)
    except _Damaged as e:
        return str(e)
    except OSError as e:
        raise RunError(f"checkpoint {str(path)!r} cannot be read: {_describe_os_error(e)}.") from None
    return None


def load_checkpoint(path: Path, template: Any, *, fingerprint: str) -> tuple[int, Any]:
    """Reads a checkpoint into the structure of ``template``; returns ``(step, state)``.

    ``template`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``);
    ``fingerprint`` is the :func:`checkpoint_fingerprint` of the config resuming it.

    Raises :class:`RunError` when the file is unreadable or damaged, from another config, or does
    not match the template's structure, shapes or dtypes.
    """
    try:
        meta, arrays = _read_checkpoint(path)
    except _Damaged as e:
        raise RunError(f"checkpoint {str(path)!r} is damaged: {e}. Resume with --resume, which "
                       "moves damaged checkpoints aside and uses the newest intact one.") from None
    except OSError as e:
        raise RunError(f"checkpoint {str(path)!r} cannot be read: {_describe_os_error(e)}.") from None
    _check_fingerprint(path, meta, fingerprint)
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(arrays) != len(leaves) or meta["treedef"] != str(treedef):
        raise RunError(
            f"checkpoint {str(path)!r} holds {len(arrays)} arrays with structure {meta['treedef']}"
            f", expected {len(leaves)} with structure {treedef}."
        )
    restored = []
    for i, (arr, ref) in enumerate(zip(arrays, leaves, strict=True)):
        want = np.dtype(ref.dtype)
        if arr.shape != tuple(np.shape(ref)) or arr.dtype != want:
            raise RunError(
                f"checkpoint {str(path)!r} leaf {i} has shape {arr.shape} and dtype {arr.dtype}, "
                f"expected {tuple(np.shape(ref))} and {want}."
            )
        restored.append(arr)
    return meta["step"], jax.tree_util.tree_unflatten(treedef, restored)


class MetricsLog:
    """Append-only ``metrics.jsonl`` that, on resume, forgets steps after the restored checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        """Every complete record (a torn last line from a killed run is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
        return out

    def rewind(self, phase: str, step: int) -> None:
        """Drops records of ``phase`` with ``step >= step`` (they will be recomputed)."""
        kept = [r for r in self.records() if not (r.get("phase") == phase and r["step"] >= step)]
        with _writing(self.path, _AFTER_WRITE_FAILURE):
            _files.write_atomic_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        """Appends one line; a failed write is cut off again, so no torn line is left behind."""
        line = (json.dumps(record) + "\n").encode()
        with _writing(self.path, _AFTER_WRITE_FAILURE), open(self.path, "ab") as f:
            end = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(end)
                raise
