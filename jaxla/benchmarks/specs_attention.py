"""Shapes shared by the attention benchmark and tests (plain data).

Each case is ``(B, T, N, K, H)``: batch, sequence length (T = S, self-attention), query heads,
key/value heads, head dim. The issue's reference point is B=1, N=8, H=64 in float32 on a 2-core CPU.
"""

HEADLINE = dict(B=1, N=8, K=8, H=64)

# Forward, causal and not, over a sweep of T.
FORWARD_T = [1024, 2048, 4096]
# Forward + backward (the target is causal T=4096).
FWD_BWD_T = [2048, 4096]
# Grouped-query attention: 8 query heads sharing 2 kv heads.
GQA = dict(B=1, T=2048, N=8, K=2, H=64)
# Causal forward + backward whose peak memory must stay under 1 GB beyond the inputs.
MEMORY_T = 16384

# Decoding: one query position against a long cache (memory-bound), small batches.
DECODE = [dict(B=1, S=32768, N=8, K=8, H=64), dict(B=4, S=32768, N=8, K=8, H=64),
          dict(B=4, S=32768, N=8, K=2, H=64)]

# --quick: the same rows at small T (about 20 s on 2 cores, jax.nn and torch included).
QUICK_FORWARD_T = [512]
QUICK_FWD_BWD_T = [512]
QUICK_GQA = dict(B=1, T=512, N=8, K=2, H=64)
QUICK_MEMORY_T = 1024
QUICK_DECODE = [dict(B=2, S=4096, N=8, K=8, H=64)]

# GPU/TPU sizes (bf16 is the realistic dtype there; the suite keeps f32 to compare with the CPU).
GPU_FORWARD_T = [4096, 16384]
GPU_FWD_BWD_T = [4096, 16384]
