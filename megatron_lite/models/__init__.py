"""Model architectures, registered by name (see `registry.py`).

Importing this package registers every architecture listed below, so
`get_model_spec(name)` finds them.
"""
from megatron_lite.models.registry import ModelSpec, get_model_spec, model_names, register
from megatron_lite.models import gpt  # noqa: F401  (registers "gpt")
from megatron_lite.models import t5  # noqa: F401  (registers "t5")
from megatron_lite.models import longformer  # noqa: F401  (registers "longformer")
from megatron_lite.models import transformer_xl  # noqa: F401  (registers "transformer_xl")
from megatron_lite.models import longnet  # noqa: F401  (registers "longnet")
from megatron_lite.models.gpt import GPTConfig, GPTModel
from megatron_lite.models.longformer import LongformerConfig, LongformerModel
from megatron_lite.models.t5 import T5Config, T5DataConfig, T5Model

__all__ = ["ModelSpec", "get_model_spec", "model_names", "register", "GPTConfig", "GPTModel",
           "LongformerConfig", "LongformerModel", "T5Config", "T5DataConfig", "T5Model"]
