"""The smollm2_sentiment demo (QLoRA on a GGUF decoder, label-position-only loss).

The full path runs on a tiny random Llama GGUF with Q4_1 kernels, a Q8_0 tied embedding and BPE
tokenizer metadata, and a tiny VADER-format data file, both written here; one test scores the real
SmolLM2 zero-shot on a few held-out prompts when the files are cached.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from cli_process import kill_at_first_checkpoint  # noqa: E402
from llama_checkpoint import TINY, random_weights, tiny_tokenizer, write_gguf  # noqa: E402

from jaxla import finetune, lora, models  # noqa: E402
from jaxla.finetune import _text  # noqa: E402
from jaxla.finetune._errors import ConfigError  # noqa: E402
from jaxla.finetune.demos import smollm2_sentiment as demo  # noqa: E402
from jaxla.models import _download  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
Q = gguf.GGMLQuantizationType
POSITIVE, NEGATIVE = ["great", "fun", "good"], ["bad", "dull", "awful"]
NEUTRAL = ["the", "film", "movie", "plot", "was", "and", "a", "very"]
QUANTIZED = {"token_embd.weight": Q.Q8_0, "attn_q.weight": Q.Q4_1, "attn_k.weight": Q.Q4_1,
             "attn_v.weight": Q.Q4_1, "attn_output.weight": Q.Q4_1, "ffn_gate.weight": Q.Q4_1,
             "ffn_up.weight": Q.Q4_1, "ffn_down.weight": Q.Q4_1}
STEPS = 120  # long enough for the SIGKILL test to land between checkpoints


def _sentences(rng, n):
    out = []
    for _ in range(n):
        words = list(rng.choice(NEUTRAL, size=rng.integers(1, 6)))
        cue = rng.choice(POSITIVE + NEGATIVE)
        words.insert(int(rng.integers(0, len(words) + 1)), cue)
        out.append((" ".join(words), 1.0 if cue in POSITIVE else -1.0))
    return out


def _write_data(directory: Path, n: int = 64) -> Path:
    """VADER-format lines; the valence sign follows the cue word, |valence| <= 0.5 for every 8th."""
    rng = np.random.default_rng(3)
    lines = []
    for i, (text, sign) in enumerate(_sentences(rng, n)):
        value = sign * (0.3 if i % 8 == 0 else 1.0 + 2 * rng.random())
        lines.append(f"{i + 1}_1\t{value:.4f}\t{text}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "movieReviewSnippets_GroundTruth.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_model(path: Path, *, types=QUANTIZED) -> Path:
    rng = np.random.default_rng(11)
    sents = [f"Review: {t}\nSentiment:{' positive' if s > 0 else ' negative'}"
             for t, s in _sentences(rng, 40)]
    _, meta = tiny_tokenizer(sents, vocab_size=360)
    hf = {**TINY, "model_type": "llama", "tie_word_embeddings": True, "vocab_size": len(meta[0])}
    write_gguf(path, hf, random_weights(hf, rng), types=types, tokenizer=meta)
    return path


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    return _write_model(root / "tiny-Q4_1.gguf"), _write_data(root / "data")


def _overrides(model, data_file, *extra):
    return [
        f"smollm2_sentiment.model={model}", f"smollm2_sentiment.data={data_file.parent}",
        "smollm2_sentiment.held_out=12", "smollm2_sentiment.max_length=16",
        "smollm2_sentiment.buckets=1", "smollm2_sentiment.eval_batch=8",
        "smollm2_sentiment.eval_every=50", "smollm2_sentiment.eval_subset=6",
        "smollm2_sentiment.generations=2", "smollm2_sentiment.generation_tokens=2",
        f"train.steps={STEPS}", "train.batch_size=4", "lora.rank=2", "optim.learning_rate=0.01",
        "run.fast_compile=true", "run.plots=false", "run.checkpoint_every=5", *extra]


def _cfg(model, data_file, *extra):
    return finetune.apply_overrides(finetune.load_config(ROOT / "configs" / "smollm2_sentiment.toml"),
                                    _overrides(model, data_file, *extra))


def _run(cfg, out, **kw):
    return finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None, **kw)


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def whole(tiny_files, tmp_path_factory):
    model, data_file = tiny_files
    out = tmp_path_factory.mktemp("smollm2_run") / "whole"
    return _run(_cfg(model, data_file, "run.plots=true"), out), out


def test_full_path_summary_peft_and_plots(tiny_files, whole):
    model_file, data_file = tiny_files
    summary, out = whole
    assert not summary["interrupted"]
    m = summary["metrics"]
    # 64 lines, every 8th with |valence| <= 0.5: 56 labelled, 12 held out.
    assert m["split"] == {"corpus": 64, "labelled": 56, "train": 44, "held_out": 12,
                          "eval_subset": 6, "positive_fraction_held_out":
                              m["split"]["positive_fraction_held_out"]}
    assert m["files"]["model_sha256"] == _sha(model_file)
    assert m["files"]["data_sha256"] == _sha(data_file)
    assert m["steps"] == STEPS and np.isfinite(m["final_train_loss"])
    for name in ("accuracy_zero_shot", "accuracy_adapted"):
        assert 0.0 <= m[name] <= 1.0
    for name in ("confusion_zero_shot", "confusion_adapted"):
        assert sum(map(sum, m[name])) == 12
    held_pos = round(12 * m["split"]["positive_fraction_held_out"])
    assert sum(m["confusion_adapted"][0]) == held_pos
    # The cue word decides the label: the adapted tiny model learns it, the random one cannot.
    assert m["accuracy_adapted"] > m["accuracy_zero_shot"]
    assert m["label_loss_adapted"] < m["label_loss_zero_shot"]
    curve = m["subset_accuracy_curve"]
    assert curve["steps"] == [0, 50, 100, STEPS]
    assert len(m["generations"]) == 2 and all(g["after"] for g in m["generations"])
    # The base stays packed: the kernels are Q4_1 blocks, not float32 copies.
    assert m["base_bytes"] < 0.35 * m["base_float32_bytes"]
    delta = m["delta_w"]
    assert sorted(delta["per_module"]) == ["attn/k", "attn/o", "attn/q", "attn/v", "mlp/down",
                                           "mlp/gate", "mlp/up"]
    assert len(delta["per_layer_relative_norm"]) == 2 and delta["top"][0]["relative_norm"] > 0
    assert 0 < m["trainable_fraction"] < 0.5 and m["train_tokens_per_s"] > 0
    assert m["label_tokens"]["positive"][0] == " positive"
    for name in ("adapter.safetensors", "tokens.npz", "metrics.jsonl", "summary.json",
                 "peft/adapter_model.safetensors", "peft/adapter_config.json"):
        assert (out / name).is_file(), name
    text = finetune.format_summary(summary)
    assert "held-out accuracy" in text and "zero-shot" in text and m["files"]["data_sha256"][:16] in text

    # The PEFT export (Hugging Face module names) loads back onto the model and matches.
    model = models.load(model_file, keep_quantized=True)
    peft = models.load_peft(model, out / "peft")
    saved, _ = lora.load(out / "adapter.safetensors")
    assert sorted(peft) == sorted(saved) and len(peft) == 7
    for k, ad in saved.items():
        np.testing.assert_array_equal(np.asarray(peft[k].a), np.asarray(ad.a))
        np.testing.assert_array_equal(np.asarray(peft[k].b), np.asarray(ad.b))
        assert peft[k].scale == ad.scale
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 2 and "model.layers.1.self_attn.q_proj" in config["target_modules"]

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ["loss.png", "accuracy.png", "singular_values_attn_q.png"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_sigkill_then_resume_is_bitwise_exact(tiny_files, whole, tmp_path):
    model_file, data_file = tiny_files
    reference = whole[1]
    out = tmp_path / "killed"
    # Generations are operational (not in the fingerprint): skipped here to save their compile.
    quick = ("run.plots=false", "smollm2_sentiment.generations=0")
    kill_at_first_checkpoint(ROOT / "configs" / "smollm2_sentiment.toml",
                             _overrides(model_file, data_file, *quick), out)
    resumed = _run(_cfg(model_file, data_file, *quick), out, resume=True)
    assert resumed["metrics"]["steps"] == STEPS
    for name in ("adapter.safetensors", "peft/adapter_model.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert resumed["metrics"]["subset_accuracy_curve"] == whole[0]["metrics"]["subset_accuracy_curve"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS))


@pytest.mark.parametrize("override, match", [
    ("smollm2_sentiment.positive= very positive", r"smollm2_sentiment\.positive = ' very positive' "
                                                  r"is 2 tokens"),
    ("smollm2_sentiment.held_out=56", r"smollm2_sentiment\.held_out = 56 leaves no training"),
    ("smollm2_sentiment.max_length=4", r"smollm2_sentiment\.max_length = 4 leaves"),
    ("smollm2_sentiment.max_length=80", r"smollm2_sentiment\.max_length = 80 .* at most 64"),
    ("lora.targets=nothing_here", r"lora\.targets"),
    ("lora.init=pissa", r"lora\.init"),
    ("mesh.model=7", r"mesh\.model = 7"),
    ("smollm2_sentiment.prompt=no slot", r"smollm2_sentiment\.prompt"),
])
def test_config_errors(tiny_files, tmp_path, override, match):
    model_file, data_file = tiny_files
    with pytest.raises(ConfigError, match=match):
        _run(_cfg(model_file, data_file, override), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "adapt").exists()


def test_float_kernels_and_missing_files_are_config_errors(tiny_files, tmp_path):
    model_file, data_file = tiny_files
    plain = _write_model(tmp_path / "f32.gguf", types={})
    with pytest.raises(ConfigError, match="are not quantized"):
        _run(_cfg(plain, data_file), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"smollm2_sentiment\.model"):
        _run(_cfg(tmp_path / "nope.gguf", data_file), tmp_path / "run2")
    with pytest.raises(ConfigError, match=r"smollm2_sentiment\.data"):
        _run(_cfg(model_file, tmp_path / "empty" / "x.txt"), tmp_path / "run3")


def test_fit_bucket_lengths_and_left_padding():
    assert _text.fit_bucket_lengths([5, 30, 31, 40, 64, 64, 20, 33], 3) in ((8, 40, 64), (32, 40, 64))
    assert _text.fit_bucket_lengths([3, 9, 17], 1) == (17,)
    assert _text.fit_bucket_lengths([3, 9, 17], 5) == (8, 16, 17)  # never more than the sizes need
    assert _text.fit_bucket_lengths([7, 7, 7], 3) == (7,)
    # Exhaustive check of the dynamic programme on random sizes.
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=40)
    cands = sorted({min(-(-int(s) // 8) * 8, int(sizes.max())) for s in sizes})

    def cost(lengths):
        return sum(min(t for t in lengths if t >= s) for s in sizes)

    import itertools

    best = min(cost((*c, cands[-1])) for k in range(3) for c in itertools.combinations(cands[:-1], k))
    assert cost(_text.fit_bucket_lengths(sizes, 3)) == best
    b = _text.bucketize([np.array([1, 2], np.int32), np.array([3, 4, 5], np.int32)], (4,),
                        pad_side="left")
    np.testing.assert_array_equal(b.ids[0], [[0, 0, 1, 2], [0, 3, 4, 5]])
    np.testing.assert_array_equal(b.mask[0], [[0, 0, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match="pad_side"):
        _text.bucketize([np.array([1])], (4,), pad_side="middle")


def test_prompt_and_label_checks():
    assert demo.check_prompt("Review: {text}\nSentiment:") == ("Review: ", "\nSentiment:")
    with pytest.raises(ValueError, match="exactly once"):
        demo.check_prompt("{text} {text}")


def _cached(name):
    try:
        return _download.resolve(name).exists()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not (_cached("smollm2-135m-instruct") and _cached("vader-sentiment")),
                    reason="needs `jaxla download smollm2-135m-instruct vader-sentiment`")
def test_real_files_zero_shot_on_a_few_prompts():
    from jaxla import data

    model = models.load("smollm2-135m-instruct", keep_quantized=True)
    tok = model.tokenizer
    ids = demo.label_token_ids(tok, "\nSentiment:", (" positive", " negative"))
    assert ids == (tok.token_to_id("Ġpositive"), tok.token_to_id("Ġnegative"))
    texts, valence = data.vader_sentiment("vader-sentiment")
    keep = np.flatnonzero(np.abs(valence) > 0.5)
    assert keep.size == 10043
    _, held = _text.split(keep.size, seed=0, held_out=1000)
    rows = keep[held[:16]]
    seqs = [np.asarray(tok.encode(f"Review: {texts[i]}\nSentiment:").ids, np.int32) for i in rows]
    buckets = _text.bucketize(seqs, (max(s.size for s in seqs),), pad_side="left")
    import jax

    score = jax.jit(lambda p, ads, x, m: demo._scores(model.config, ids, p, ads, x, m))
    y = (valence[rows] < 0).astype(np.int64)
    ev = demo._evaluate(score, model.params, {}, buckets, y, 16)
    # The frozen model is far better than chance zero-shot (0.80 on 300 prompts with transformers).
    assert np.mean(ev.pred == y) >= 0.6 and 0.0 < ev.label_mass < 1.0


def test_benchmark_rows_know_the_demo():
    from jaxla.benchmarks import finetune as suite
    from jaxla.benchmarks import specs_finetune

    assert suite.demo_config_path("smollm2_sentiment") == "smollm2_sentiment"
    assert specs_finetune.TARGET_SMOLLM2_S == 360.0
    missing = suite.smollm2_missing_files()
    cached = _cached("smollm2-135m-instruct") and _cached("vader-sentiment")
    assert (missing is None) == cached
    if not cached:
        assert "jaxla download" in missing
