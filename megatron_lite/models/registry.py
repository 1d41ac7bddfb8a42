"""Model registry: one record per architecture, looked up by name.

A `ModelSpec` bundles what the trainer, the checkpoint tools and the generation script need to
know about a model without importing it by hand: its config dataclass, how to build it on a
`ParallelState`, its FLOPs per token (for MFU) and the training objective its batches follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

_REGISTRY: dict[str, "ModelSpec"] = {}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """Registry key, e.g. "gpt" (the `--model` flag)."""
    config_cls: type
    """Config dataclass; the YAML `model:` section and the CLI flags fill it."""
    build: Callable[..., Any]
    """`build(config, ps, rng) -> nn.Module` with TP-sharded layers on `ps`."""
    flops_per_token: Callable[[Any, int], float]
    """`flops_per_token(config, seq_len)`: model FLOPs (forward + backward) per trained token."""
    objective: str
    """Name of the data objective whose batches the model consumes, e.g. "causal_lm"."""
    tokens_per_sample: Callable[[Any, Any], int] | None = None
    """`tokens_per_sample(config, data_config)`: tokens one training sample feeds the model, for
    tokens/s. None: data_config.seq_length. (An encoder-decoder counts both stacks' tokens.)"""
    flops_per_sample: Callable[[Any, Any], float] | None = None
    """`flops_per_sample(config, data_config)`: model FLOPs (forward + backward) of one training
    sample, for MFU. None: flops_per_token(config, seq_length) x seq_length."""

    def sample_cost(self, config, data_config) -> tuple[int, float]:
        """(tokens, model FLOPs) of one training sample under `data_config`."""
        seq = data_config.seq_length
        tokens = self.tokens_per_sample(config, data_config) if self.tokens_per_sample else seq
        flops = (self.flops_per_sample(config, data_config) if self.flops_per_sample
                 else self.flops_per_token(config, seq) * seq)
        return tokens, flops


def register(spec: ModelSpec) -> ModelSpec:
    """Add `spec` under `spec.name`. Registering a different spec under a taken name is an error."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"model '{spec.name}' is already registered "
                         f"(by {existing.build.__module__}); pick another name")
    _REGISTRY[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered as `name`; an unknown name is an error listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise KeyError(f"unknown model '{name}'; known models: {known}") from None


def model_names() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)
