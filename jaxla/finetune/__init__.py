"""Configured fine-tune demos behind ``jaxla finetune``: TOML configs, exact resume, device meshes.

The demos form a registry: each is one module of :mod:`jaxla.finetune.demos` with its config
section and its run, plus its built-in config file beside it. ``run.demo`` chooses one:

- ``"lowrank"`` (the default): LoRA with r = 8 recovers a known rank-8 update of a frozen 768 × 3072
  matrix; reports the loss, the relative error of the update, principal angles and singular values.
- ``"tiny_lm"``: a small decoder-only transformer built from jaxla parts is pretrained on one generated
  task, frozen, and LoRA-adapted to another; reports base vs adapted accuracy against a full
  fine-tune baseline and prints generations decoded with the KV cache.

Use from Python::

    cfg = jaxla.finetune.apply_overrides(jaxla.finetune.load_config(None), ["train.steps=100"])
    summary = jaxla.finetune.run_finetune(cfg, out="runs/demo")
    print(jaxla.finetune.format_summary(summary))

``load_config("tiny_lm")`` reads a built-in config by name (:func:`builtin_configs` lists them).
"""

from jaxla.finetune._api import format_summary, run_finetune
from jaxla.finetune._config import (
    LoraConfig,
    MeshConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_fingerprint,
    config_to_dict,
    config_to_toml,
)
from jaxla.finetune._errors import ConfigError, NonFiniteLossError, RunError
from jaxla.finetune._loader import Config, apply_overrides, load_config
from jaxla.finetune._registry import builtin_config_names as builtin_configs
from jaxla.finetune._registry import names as demo_names
from jaxla.finetune.demos.lowrank import LowRankConfig
from jaxla.finetune.demos.tiny_lm import TinyLMConfig

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
    "builtin_configs",
    "config_fingerprint",
    "config_to_dict",
    "config_to_toml",
    "demo_names",
    "format_summary",
    "load_config",
    "run_finetune",
]
