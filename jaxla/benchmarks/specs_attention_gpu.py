"""Shapes shared by the Pallas attention tests and ``jaxla/benchmarks/attention_gpu.py`` (plain data).

Timing follows the issue: bf16, B·T = 16k tokens, N = 16 query heads, H = 128, T in {1024, 4096,
16384}, causal and not, forward and forward+backward. Checks use odd lengths (not block multiples),
GQA and the mask features that ``jax.nn.dot_product_attention`` shares with the kernel.
"""

TOKENS = 16384
HEADS = 16
HEAD_DIM = 128
SEQ_LENS = (1024, 4096, 16384)
IMPLEMENTATIONS = ("pallas", "cudnn", "xla")

# (name, B, T, N, K, H, causal, local_window_size, with kv lengths)
CHECKS = [
    ("gqa causal kv-lengths", 2, 1000, 16, 4, 128, True, None, True),
    ("window (128, 64)", 1, 777, 8, 8, 128, False, (128, 64), False),
    ("head dim 64 causal", 2, 300, 4, 2, 64, True, None, False),
    ("head dim 256 causal", 1, 257, 4, 4, 256, True, None, False),
]

# --quick: interpret mode on CPU, tiny shapes.
QUICK_TOKENS = 64
QUICK_HEADS = 2
QUICK_HEAD_DIM = 64
QUICK_SEQ_LENS = (64,)
QUICK_CHECKS = [("gqa causal kv-lengths", 1, 37, 4, 2, 64, True, None, True)]
