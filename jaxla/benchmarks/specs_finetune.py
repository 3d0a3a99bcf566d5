"""Config overrides of the fine-tune benchmark suite (plain data, shared with its test)."""

# --quick: the same demos at toy sizes so the whole suite validates in seconds.
QUICK_LOWRANK = [
    "lowrank.d_in=64", "lowrank.d_out=256", "lowrank.true_rank=4", "lora.rank=4",
    "train.steps=20", "train.batch_size=16", "lowrank.eval_examples=64", "run.fast_compile=true",
]
QUICK_TINY_LM = [
    "tiny_lm.n_layers=1", "tiny_lm.d_model=16", "tiny_lm.n_heads=2", "tiny_lm.d_ff=32",
    "tiny_lm.length=3", "tiny_lm.pretrain_steps=5", "train.steps=5", "train.batch_size=8",
    "tiny_lm.eval_examples=16", "tiny_lm.generations=1", "lora.rank=2", "run.fast_compile=true",
    "tiny_lm.full_ft_baseline=false",
]

# Full runs use the shipped configs unchanged (the README's demos).
FULL_LOWRANK: list[str] = []
FULL_TINY_LM: list[str] = []
FULL_MINILM: list[str] = []
FULL_SMOLLM2: list[str] = []

# Targets from the issue, in seconds, for a fresh process on 2 CPU cores.
TARGET_LOWRANK_S = 60.0
TARGET_TINY_LM_S = 300.0
TARGET_MINILM_S = 120.0  # the real-data demo (issue 15)
TARGET_SMOLLM2_S = 360.0  # the QLoRA demo on SmolLM2-135M (issue 15)
