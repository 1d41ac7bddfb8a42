"""Model architectures, registered by name (see `registry.py`).

Importing this package registers every architecture listed below, so
`get_model_spec(name)` finds them.
"""
from megatron_lite.models.registry import ModelSpec, get_model_spec, model_names, register
from megatron_lite.models import gpt  # noqa: F401  (registers "gpt")
from megatron_lite.models.gpt import GPTConfig, GPTModel

__all__ = ["ModelSpec", "get_model_spec", "model_names", "register", "GPTConfig", "GPTModel"]
