"""Shapes shared by the Pallas attention tests and ``jaxla/benchmarks/attention_gpu.py`` (plain data).

Timing follows the issue: bf16, B·T = 16k tokens, N = 16 query heads, H = 128, T in {1024, 4096,
16384}, causal and not, forward and forward+backward. Checks use odd lengths (not block multiples),
GQA and every visibility feature of the kernel, against jaxla's plain-XLA reference in f32 at
highest matmul precision (so TF32 never decides a check).
"""

from typing import NamedTuple

TOKENS = 16384
HEADS = 16
HEAD_DIM = 128
SEQ_LENS = (1024, 4096, 16384)
IMPLEMENTATIONS = ("pallas", "cudnn", "xla")
# jax.nn's XLA forward+backward materialises B·N·T² f32 logits and their gradient (17 GB at T = 16k):
# minutes of the check's budget for a reference nobody uses at that length. It is skipped there.
XLA_BACKWARD_MAX_T = 4096


class Check(NamedTuple):
    """One numerics check of the compiled kernel (forward and gradients)."""

    name: str
    b: int
    t: int
    n: int
    k: int
    h: int
    causal: bool = False
    window: tuple[int, int] | None = None
    lengths: bool = False
    softcap: float | None = None
    segments: bool = False
    dtype: str = "bfloat16"


CHECKS = [
    Check("gqa causal kv-lengths", 2, 1000, 16, 4, 128, causal=True, lengths=True),
    Check("window (128, 64)", 1, 777, 8, 8, 128, window=(128, 64)),
    Check("head dim 64 causal", 2, 300, 4, 2, 64, causal=True),
    Check("head dim 256 causal", 1, 257, 4, 4, 256, causal=True),
    Check("softcap 30 causal gqa", 1, 515, 8, 2, 128, causal=True, softcap=30.0),
    Check("segments mqa", 2, 400, 4, 1, 128, segments=True),
    Check("f16 h64 window", 1, 333, 4, 2, 64, window=(64, 0), dtype="float16"),
]

# --quick: interpret mode on CPU, tiny shapes.
QUICK_TOKENS = 64
QUICK_HEADS = 2
QUICK_HEAD_DIM = 64
QUICK_SEQ_LENS = (64,)
QUICK_CHECKS = [Check("gqa causal kv-lengths", 1, 37, 4, 2, 64, causal=True, lengths=True)]
