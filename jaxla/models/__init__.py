"""Pretrained models as plain jaxla pytrees: load GGUF and Hugging Face checkpoints, run, generate,
embed and adapt them with LoRA, and lay them out over a device mesh (:func:`shard`: tensor parallel
over a ``model`` axis, FSDP over ``data``; the rules by parameter path in :func:`sharding_rules`).

Families: ``llama`` (Llama 2/3, SmolLM, Qwen2, Mistral; GGUF or Hugging Face) and ``bert`` (BERT-style
encoders such as all-MiniLM-L6-v2; Hugging Face). Known downloadable names: see :func:`download`.

Dimension legend: B batch, T tokens, V vocabulary, D model width, L layers.
"""

from jaxla.models._api import embed, forward, load, quantize
from jaxla.models._bert import BertConfig
from jaxla.models._download import download, known_models
from jaxla.models._family import Model
from jaxla.models._generate import format_chat, generate
from jaxla.models._llama import LlamaConfig
from jaxla.models._peft import load_peft, save_peft
from jaxla.models._sharding import (
    ShardingRule,
    param_shardings,
    param_specs,
    shard,
    sharding_rules,
    tree_specs,
)

__all__ = [
    "BertConfig",
    "LlamaConfig",
    "Model",
    "ShardingRule",
    "download",
    "embed",
    "format_chat",
    "forward",
    "generate",
    "known_models",
    "load",
    "load_peft",
    "param_shardings",
    "param_specs",
    "quantize",
    "save_peft",
    "shard",
    "sharding_rules",
    "tree_specs",
]
