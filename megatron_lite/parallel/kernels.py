"""Which fused kernels a run uses: NVIDIA apex's, when it is there, or torch's.

apex is not on PyPI (it is built from source, github.com/NVIDIA/apex; the PyPI package named
"apex" is an unrelated web toolkit), so it is found at run time. On CUDA it brings
FusedLayerNorm (one kernel for the forward, one for the backward) and FusedAdam (one multi-tensor
launch per step). The choice is `training.fused_kernels` / `--fused-kernels`:
  auto   apex on a CUDA machine where it imports, torch otherwise (the default);
  apex   apex, or a one-line error saying why it cannot be used;
  torch  torch's LayerNorm and AdamW (or DeepSpeed's CPU Adam under ZeRO-Offload).
Both give the same results within float rounding; apex only changes speed. The trainer resolves
the choice once, before it builds the model (`use_fused_kernels`), so every layer norm a model
makes through `layer_norm_class()` is of the chosen kind.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from megatron_lite.errors import ConfigError

CHOICES = ("auto", "apex", "torch")
_chosen = "torch"


def apex_unavailable_reason() -> str | None:
    """None when apex's FusedLayerNorm and FusedAdam can run here, else why not."""
    if not torch.cuda.is_available():
        return "apex's fused kernels need a CUDA device, and this machine has none"
    try:
        importlib.import_module("apex.normalization")
        importlib.import_module("apex.optimizers")
    except ImportError as e:
        return (f"apex is not importable ({e}); build NVIDIA apex from source "
                "(github.com/NVIDIA/apex; the PyPI package named apex is unrelated)")
    return None


def resolve_fused_kernels(choice: str) -> tuple[str, str | None]:
    """("apex" or "torch", why apex is not used or None) for the configured `choice`."""
    if choice not in CHOICES:
        raise ConfigError(f"training.fused_kernels / --fused-kernels must be one of "
                          f"{', '.join(CHOICES)}, got {choice!r}")
    if choice == "torch":
        return "torch", "training.fused_kernels is torch"
    reason = apex_unavailable_reason()
    if reason is None:
        return "apex", None
    if choice == "apex":
        raise ConfigError(f"training.fused_kernels / --fused-kernels apex: {reason}; or use auto "
                          "(apex when it can run, torch otherwise) or torch")
    return "torch", reason


def use_fused_kernels(kind: str) -> None:
    """Make `layer_norm_class()` (and the trainer's optimizer) `kind`'s: "apex" or "torch"."""
    global _chosen
    if kind not in ("apex", "torch"):
        raise ValueError(f"kind must be 'apex' or 'torch' (resolve 'auto' first), got {kind!r}")
    _chosen = kind


def fused_kernels() -> str:
    """The kind in use: "apex" or "torch"."""
    return _chosen


def layer_norm_class() -> type[nn.Module]:
    """apex's FusedLayerNorm (the same parameters, weight and bias, as torch's) or nn.LayerNorm."""
    if _chosen == "apex":
        return importlib.import_module("apex.normalization").FusedLayerNorm
    return nn.LayerNorm


def fused_adam_class() -> type[torch.optim.Optimizer]:
    """apex's FusedAdam; build it with adam_w_mode=True for AdamW's decoupled weight decay."""
    return importlib.import_module("apex.optimizers").FusedAdam
