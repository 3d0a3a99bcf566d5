"""The minilm_sentiment demo and its shared text pipeline (jaxla.finetune._text).

The full path runs on a tiny random BERT checkpoint and a tiny VADER-format file written here; one
test runs the real all-MiniLM-L6-v2 and VADER files for a few steps when they are cached.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from bert_checkpoint import WORDS, write_checkpoint
from cli_process import kill_at_first_checkpoint

from jaxla import finetune, lora
from jaxla.finetune import _text
from jaxla.finetune._errors import ConfigError
from jaxla.finetune.demos import minilm_sentiment as demo
from jaxla.models import _download

ROOT = Path(__file__).resolve().parent.parent
POSITIVE, NEGATIVE = ["big", "red", "house"], ["small", "dog", "ran"]


def _write_data(directory: Path, n: int = 72) -> Path:
    """VADER-format lines whose valence is the count of 'positive' minus 'negative' words."""
    rng = np.random.default_rng(7)
    words = [w for w in WORDS[4:] if not w.startswith("##")]
    lines = []
    for i in range(n):
        sentence = list(rng.choice(words, size=rng.integers(2, 9)))
        score = sum(w in POSITIVE for w in sentence) - sum(w in NEGATIVE for w in sentence)
        value = float(np.clip(score + 0.1 * rng.standard_normal(), -4, 4))
        lines.append(f"{i + 1}_1\t{value:.4f}\t{' '.join(sentence)}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "movieReviewSnippets_GroundTruth.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    write_checkpoint(root / "model", np.random.default_rng(0))
    return root / "model", _write_data(root / "data")


def _overrides(model_dir, data_file, *extra):
    return [
        f"minilm_sentiment.model={model_dir}",
        f"minilm_sentiment.data={data_file.parent}",
        "minilm_sentiment.held_out=16", "minilm_sentiment.train_examples=40",
        "minilm_sentiment.max_length=12", "minilm_sentiment.buckets=2", "train.steps=6",
        "train.batch_size=8", "lora.rank=2", "run.fast_compile=true", "run.plots=false",
        "run.checkpoint_every=2", *extra]


def _cfg(model_dir, data_file, *extra):
    return finetune.apply_overrides(finetune.load_config(ROOT / "configs" / "minilm_sentiment.toml"),
                                    _overrides(model_dir, data_file, *extra))


def _run(cfg, out, **kw):
    return finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None, **kw)


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_full_path_resume_is_bitwise_exact(tiny_files, tmp_path):
    model_dir, data_file = tiny_files
    cfg = _cfg(model_dir, data_file, "run.plots=true")
    whole = _run(cfg, tmp_path / "whole")
    assert not whole["interrupted"]
    m = whole["metrics"]
    assert m["split"] == {"corpus": 72, "train_pool": 56, "train": 40, "held_out": 16}
    assert m["files"]["model_sha256"] == _sha(model_dir / "model.safetensors")
    assert m["files"]["data_sha256"] == _sha(data_file)
    assert m["bucket_lengths"] == [8, 12] and sum(m["bucket_sizes_train"]) == 40
    assert np.isfinite(m["pearson_r_probe"]) and np.isfinite(m["pearson_r_lora"])
    assert m["steps"] == 6 and np.isfinite(m["final_train_loss"])
    for name in ("adapter.safetensors", "head.npz", "tokens.npz", "metrics.jsonl"):
        assert (tmp_path / "whole" / name).is_file()
    adapters, _ = lora.load(tmp_path / "whole" / "adapter.safetensors")
    assert sorted(adapters) == [f"layers/{p}/w" for p in
                                ("attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/up")]
    assert adapters["layers/attn/q/w"].a.shape == (2, 2, 16)  # (L, r, D), stacked layers
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots = []
    else:
        plots = ["loss.png", "pca_before.png", "pca_after.png"]
    for name in plots:
        assert (tmp_path / "whole" / name).read_bytes()[:4] == b"\x89PNG"
    text = finetune.format_summary(whole)
    assert "held-out Pearson r" in text and m["files"]["data_sha256"][:16] in text

    # Stopped after 3 steps (checkpoints at 2 and 3), then resumed: the same bytes as one run.
    out = tmp_path / "resumed"
    assert _run(cfg, out, stop_after=3)["interrupted"]
    resumed = _run(cfg, out, resume=True)
    assert resumed["metrics"]["pearson_r_lora"] == m["pearson_r_lora"]
    assert (out / "adapter.safetensors").read_bytes() == (
        tmp_path / "whole" / "adapter.safetensors").read_bytes()
    assert (out / "head.npz").read_bytes() == (tmp_path / "whole" / "head.npz").read_bytes()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))


def test_sigkill_then_resume_is_bitwise_exact(tiny_files, tmp_path):
    model_dir, data_file = tiny_files
    extra = ("train.steps=400", "run.checkpoint_every=5", "minilm_sentiment.buckets=1")
    reference = tmp_path / "reference"
    _run(_cfg(model_dir, data_file, *extra), reference)
    out = tmp_path / "killed"
    kill_at_first_checkpoint(ROOT / "configs" / "minilm_sentiment.toml",
                             _overrides(model_dir, data_file, *extra), out)
    resumed = _run(_cfg(model_dir, data_file, *extra), out, resume=True)
    assert resumed["metrics"]["steps"] == 400
    assert (out / "adapter.safetensors").read_bytes() == (
        reference / "adapter.safetensors").read_bytes()
    assert (out / "head.npz").read_bytes() == (reference / "head.npz").read_bytes()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(400))


def test_nan_loss_stops_cleanly(tiny_files, tmp_path):
    model_dir, data_file = tiny_files
    cfg = _cfg(model_dir, data_file, "optim.learning_rate=1e30", "optim.warmup_steps=0",
               "optim.grad_clip=0.0", "optim.schedule=constant")
    with pytest.raises(finetune.NonFiniteLossError, match="training stopped"):
        _run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


@pytest.mark.parametrize("override, match", [
    ("lora.init=pissa", r"lora\.init"),
    ("lora.dora=true", r"lora\.dora"),
    ("minilm_sentiment.max_length=40", "max_length"),
    ("lora.targets=nothing_here", r"lora\.targets"),
])
def test_config_errors(tiny_files, tmp_path, override, match):
    model_dir, data_file = tiny_files
    with pytest.raises(ConfigError, match=match):
        _run(_cfg(model_dir, data_file, override), tmp_path / "run")


def test_missing_files_are_config_errors(tiny_files, tmp_path):
    model_dir, data_file = tiny_files
    cfg = _cfg(tmp_path / "nope", data_file)
    with pytest.raises(ConfigError, match=r"minilm_sentiment\.model"):
        _run(cfg, tmp_path / "run")
    cfg = _cfg(model_dir, tmp_path / "empty" / "x.txt")
    with pytest.raises(ConfigError, match=r"minilm_sentiment\.data"):
        _run(cfg, tmp_path / "run2")


def test_ridge_fit_matches_lstsq():
    rng = np.random.default_rng(1)
    x, y, lam = rng.standard_normal((30, 5)), rng.standard_normal(30), 0.1
    w, b = demo.ridge_fit(x, y, lam)
    # Reference: augmented least squares with an unpenalised intercept column.
    aug = np.vstack([np.hstack([x, np.ones((30, 1))]),
                     np.hstack([np.sqrt(lam * 30) * np.eye(5), np.zeros((5, 1))])])
    ref = np.linalg.lstsq(aug, np.concatenate([y, np.zeros(5)]), rcond=None)[0]
    np.testing.assert_allclose(np.append(w, b), ref, rtol=1e-10, atol=1e-12)


def test_bucket_lengths():
    assert demo.bucket_lengths(64, 2) == (32, 64)
    assert demo.bucket_lengths(64, 3) == (24, 48, 64)
    assert demo.bucket_lengths(12, 4) == (8, 12)
    assert demo.bucket_lengths(5, 1) == (5,)


def test_split_is_fixed_by_the_seed():
    train, held = _text.split(100, seed=3, held_out=20)
    assert held.size == 20 and train.size == 80
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(100))
    again = _text.split(100, seed=3, held_out=20)
    assert np.array_equal(held, again[1]) and not np.array_equal(held, _text.split(100, seed=4,
                                                                                   held_out=20)[1])
    with pytest.raises(ValueError, match="held_out"):
        _text.split(10, seed=0, held_out=10)


def test_bucketize_pads_and_keeps_order():
    seqs = [np.arange(1, k + 1, dtype=np.int32) for k in (3, 8, 1, 5, 4)]
    b = _text.bucketize(seqs, (4, 8))
    assert [x.shape for x in b.ids] == [(3, 4), (2, 8)]
    assert [list(i) for i in b.index] == [[0, 2, 4], [1, 3]]
    np.testing.assert_array_equal(b.ids[0][0], [1, 2, 3, 0])
    np.testing.assert_array_equal(b.mask[1].sum(1), [8, 5])
    with pytest.raises(ValueError, match="longest bucket"):
        _text.bucketize(seqs, (4, 6))
    with pytest.raises(ValueError, match="increasing"):
        _text.bucketize(seqs, (8, 4))


def test_batch_schedule_covers_each_epoch_once():
    s = _text.batch_schedule([5, 3], steps=8, batch_size=2, seed=0)
    assert s.bucket.shape == (8,) and s.rows.shape == (8, 2) and s.epochs == 2
    # One epoch: 3 + 2 batches; every row of every bucket exactly once, padding weighted 0.
    seen = sorted((int(b), int(r)) for b, rows, w in zip(s.bucket[:5], s.rows[:5], s.weight[:5],
                                                          strict=True)
                  for r, wi in zip(rows, w, strict=True) if wi)
    assert seen == [(0, r) for r in range(5)] + [(1, r) for r in range(3)]
    # The second epoch (steps 5..7) repeats no row within itself; every batch has a real example.
    second = [(int(b), int(r)) for b, rows, w in zip(s.bucket[5:], s.rows[5:], s.weight[5:],
                                                     strict=True)
              for r, wi in zip(rows, w, strict=True) if wi]
    assert len(second) == len(set(second)) and (s.weight.sum(1) >= 1).all()
    again = _text.batch_schedule([5, 3], steps=8, batch_size=2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(s[:3], again[:3], strict=True))
    other = _text.batch_schedule([5, 3], steps=8, batch_size=2, seed=1)
    assert not np.array_equal(s.rows, other.rows)


class _NoTokenizer:
    def to_str(self):
        raise AssertionError("the cache should have been read")


def test_tokenize_cache_is_reused_and_validated(tiny_files, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_files[0] / "tokenizer.json"))
    texts = ["the cat sat", "a big red house on the mat"]
    first = _text.tokenize_cached(tok, texts, max_length=5, cache_dir=tmp_path, key="k")
    assert [s.tolist() for s in first] == [[2, 4, 5, 6, 3], [2, 9, 15, 14, 3]]
    again = _text.tokenize_cached(_NoTokenizer(), texts, max_length=5, cache_dir=tmp_path, key="k")
    assert [s.tolist() for s in again] == [s.tolist() for s in first]
    # Another key, or a damaged cache, is ignored and rewritten.
    (tmp_path / _text.CACHE_NAME).write_bytes(b"not a zip file")
    redo = _text.tokenize_cached(tok, texts, max_length=5, cache_dir=tmp_path, key="k")
    assert [s.tolist() for s in redo] == [s.tolist() for s in first]
    with pytest.raises(AssertionError, match="cache"):
        _text.tokenize_cached(_NoTokenizer(), texts, max_length=5, cache_dir=tmp_path, key="k2")
    # A cache with ids outside the vocabulary (a tampered file) is ignored.
    path = tmp_path / _text.CACHE_NAME
    with np.load(path) as z:
        stamp, lengths, ids = z["stamp"], z["lengths"], z["ids"].copy()
    ids[0] = 999
    np.savez(path, stamp=stamp, lengths=lengths, ids=ids)
    redo = _text.tokenize_cached(tok, texts, max_length=5, cache_dir=tmp_path, key="k",
                                 vocab_size=len(WORDS))
    assert [s.tolist() for s in redo] == [s.tolist() for s in first]
    with pytest.raises(ValueError, match="vocabulary"):
        _text.tokenize_cached(tok, texts, max_length=5, cache_dir=tmp_path / "v", key="k",
                              vocab_size=10)


def _cached(name):
    try:
        return _download.resolve(name).exists()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not (_cached("all-minilm-l6-v2") and _cached("vader-sentiment")),
                    reason="needs `jaxla download all-minilm-l6-v2` and `jaxla download vader-sentiment`")
def test_real_files_few_steps(tmp_path):
    cfg = finetune.apply_overrides(finetune.load_config("minilm_sentiment"), [
        "minilm_sentiment.held_out=64", "minilm_sentiment.train_examples=32",
        "minilm_sentiment.max_length=32", "minilm_sentiment.buckets=1", "train.steps=2",
        "train.batch_size=8", "run.plots=false", "run.fast_compile=true"])
    m = _run(cfg, tmp_path / "run")["metrics"]
    assert m["split"]["corpus"] == 10605 and m["split"]["held_out"] == 64
    assert m["files"]["data_sha256"] == _sha(m["files"]["data"])
    assert m["steps"] == 2 and np.isfinite(m["pearson_r_lora"]) and m["pearson_r_probe"] > 0


def test_benchmark_rows_know_the_demo():
    from jaxla.benchmarks import finetune as suite
    from jaxla.benchmarks import specs_finetune

    assert suite.demo_config_path("minilm_sentiment") == "minilm_sentiment"
    assert specs_finetune.TARGET_MINILM_S == 120.0
    missing = suite.minilm_missing_files()
    cached = _cached("all-minilm-l6-v2") and _cached("vader-sentiment")
    assert (missing is None) == cached
    if not cached:
        assert "jaxla download" in missing
