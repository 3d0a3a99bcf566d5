"""Configured fine-tune demos behind ``jaxla finetune``: TOML configs, exact resume, device meshes.

Two demos, chosen by ``run.demo``:

- ``"lowrank"`` (the default): LoRA with r = 8 recovers a known rank-8 update of a frozen 768 × 3072
  matrix; reports the loss, the relative error of the update, principal angles and singular values.
- ``"tiny_lm"``: a small decoder-only transformer built from jaxla parts is pretrained on one generated
  task, frozen, and LoRA-adapted to another; reports base vs adapted accuracy against a full
  fine-tune baseline and prints generations decoded with the KV cache.

Use from Python::

    cfg = jaxla.finetune.apply_overrides(jaxla.finetune.load_config(None), ["train.steps=100"])
    summary = jaxla.finetune.run_finetune(cfg, out="runs/demo")
    print(jaxla.finetune.format_summary(summary))
"""

from jaxla.finetune._api import format_summary, run_finetune
from jaxla.finetune._config import (
    Config,
    ConfigError,
    LoraConfig,
    LowRankConfig,
    MeshConfig,
    OptimConfig,
    RunConfig,
    TinyLMConfig,
    TrainConfig,
    apply_overrides,
    config_fingerprint,
    config_to_toml,
    load_config,
)
from jaxla.finetune._rundir import RunError
from jaxla.finetune._runner import NonFiniteLossError

__all__ = [
    "Config",
    "ConfigError",
    "LoraConfig",
    "LowRankConfig",
    "MeshConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunConfig",
    "RunError",
    "TinyLMConfig",
    "TrainConfig",
    "apply_overrides",
    "config_fingerprint",
    "config_to_toml",
    "format_summary",
    "load_config",
    "run_finetune",
]
