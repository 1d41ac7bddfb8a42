"""The DeepSpeed engine a run trains with, and the one adapter it needs.

DeepSpeed builds the optimizer and LR schedule from the engine config that
`config.build_deepspeed_config` injects. Its ZeRO stages find a non-finite gradient norm
themselves and skip that update (and the scheduler step), reporting `optimizer.overflow`. Its
plain fp32 path (ZeRO stage 0) has no such check, though after `optimizer.step()` it reads the
same `overflow` attribute and, when it is set, counts the step as skipped and holds the schedule.
So on that path the optimizer is ours: the same torch AdamW DeepSpeed would build, given through
DeepSpeed's client-optimizer argument, whose step the trainer can mark as overflowed.
"""
from __future__ import annotations

import copy

import torch

from megatron_lite.parallel.launch import release_shared_memory_names


class SkippableAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose next step can be skipped as DeepSpeed skips an overflowed one."""

    overflow = False
    """Set before `step()`; DeepSpeed reads it after: True skips the update and the LR step."""

    def step(self, closure=None):
        if self.overflow:
            return None
        return super().step(closure)


def begin_micro_batch(engine) -> None:
    """Do what `DeepSpeedEngine.forward` does before a micro-batch, for a loss computed by the
    model's own `loss()` rather than through `engine(...)`. The ZeRO optimizers close the previous
    backward there: ZeRO-3 counts the micro-step, and without the count every backward overwrites
    the accumulated gradient partition instead of adding to it, so a step under gradient
    accumulation used only its last micro-batch, and the loss drifted from stage 0's."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    if isinstance(engine.optimizer, ZeROOptimizer):
        engine.optimizer.clear_backward_seen_flag()


def _plain_path(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization", {})
    return int(zero.get("stage", 0)) == 0


def _skippable(optimizer_class: type) -> type:
    """`optimizer_class` whose next step can be skipped, as `SkippableAdamW` is torch's AdamW."""
    def step(self, closure=None):
        return None if self.overflow else optimizer_class.step(self, closure)
    return type(f"Skippable{optimizer_class.__name__}", (optimizer_class,),
                {"overflow": False, "step": step})


def build_engine(model: torch.nn.Module, ds_config: dict, ps, fused_kernels: str = "torch"):
    """(engine, skippable optimizer or None): `deepspeed.initialize` with our mpu. On the plain
    path the injected AdamW becomes a `SkippableAdamW` with the same settings. With
    `fused_kernels="apex"` the optimizer is apex's FusedAdam in AdamW mode (skippable on the plain
    path), except under ZeRO-Offload, where DeepSpeed's CPU Adam updates the offloaded states."""
    import deepspeed
    ds_config = copy.deepcopy(ds_config)
    client_optimizer, skippable = None, []
    plain = _plain_path(ds_config)
    # build_deepspeed_config asks for torch's AdamW unless the optimizer is offloaded.
    optimizer_params = ds_config.get("optimizer", {}).get("params", {})
    offloaded = bool(optimizer_params) and "torch_adam" not in optimizer_params
    if plain or (fused_kernels == "apex" and not offloaded):
        params = dict(ds_config.pop("optimizer")["params"])
        params.pop("torch_adam", None)  # DeepSpeed's switch for torch's AdamW: this is one
        fused = params.pop("fused", False)  # torch's fused AdamW kernel; apex's is its own

        def client_optimizer(model_parameters):
            if fused_kernels == "apex":
                from megatron_lite.parallel.kernels import fused_adam_class
                cls = _skippable(fused_adam_class()) if plain else fused_adam_class()
                params["betas"] = tuple(params["betas"])
                optimizer = cls(model_parameters, **params, adam_w_mode=True)
            else:
                optimizer = SkippableAdamW(model_parameters, **params, fused=fused)
            if plain:
                skippable.append(optimizer)
            return optimizer
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config, mpu=ps, optimizer=client_optimizer)
    release_shared_memory_names()  # DeepSpeed's comm may have started here, in a caller's world
    if plain and engine.seq_dp_world_size == 1 and not engine.pipeline_parallelism:
        # Nothing to reduce: with one data-parallel rank DeepSpeed would still flatten every
        # gradient into buckets, all-reduce them over a group of one and copy them back, two
        # model-sized copies per step (0.15 s of a 1.5 s LongLM-small step on one CPU thread).
        engine.enable_backward_allreduce = False
    return engine, (skippable[0] if skippable else None)
