"""apex detection (megatron_lite/parallel/kernels.py): on this CPU machine `auto` picks torch's
kernels and `apex` is a one-line error; with an apex stand-in (a LayerNorm and an AdamW under
apex's names, so the wiring is tested without CUDA), the models' layer norms and the engine's
optimizer are apex's. The real apex kernels against torch's: the GPU test at the end."""
import os
import sys
import types

import pytest
import torch
import torch.nn as nn

from megatron_lite.errors import ConfigError
from megatron_lite.parallel import kernels
from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_real_apex() -> bool:
    return torch.cuda.is_available() and kernels.apex_unavailable_reason() is None


class StandInFusedLayerNorm(nn.LayerNorm):
    pass


class StandInFusedAdam(torch.optim.AdamW):
    def __init__(self, params, *, adam_w_mode, **kw):
        assert adam_w_mode is True  # AdamW's decoupled weight decay, as torch's AdamW
        super().__init__(params, **kw)


def _install_stand_in_apex():
    apex = types.ModuleType("apex")
    apex.normalization = types.ModuleType("apex.normalization")
    apex.normalization.FusedLayerNorm = StandInFusedLayerNorm
    apex.optimizers = types.ModuleType("apex.optimizers")
    apex.optimizers.FusedAdam = StandInFusedAdam
    sys.modules.update({"apex": apex, "apex.normalization": apex.normalization,
                        "apex.optimizers": apex.optimizers})


@pytest.fixture
def torch_kernels_after():
    yield
    kernels.use_fused_kernels("torch")
    for name in ("apex", "apex.normalization", "apex.optimizers"):
        sys.modules.pop(name, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's choice")
def test_cpu_machine_uses_torch_kernels_and_refuses_apex():
    kind, why = kernels.resolve_fused_kernels("auto")
    assert kind == "torch" and "CUDA" in why
    with pytest.raises(ConfigError) as err:
        kernels.resolve_fused_kernels("apex")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("training.fused_kernels / --fused-kernels apex: ")
    assert "auto" in message and "torch" in message
    with pytest.raises(ConfigError, match="must be one of auto, apex, torch, got 'fast'"):
        kernels.resolve_fused_kernels("fast")
    assert kernels.resolve_fused_kernels("torch")[0] == "torch"


def test_missing_apex_is_named_with_where_to_get_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError
    why = kernels.apex_unavailable_reason()
    assert "apex is not importable" in why and "github.com/NVIDIA/apex" in why


def test_the_config_key_reaches_the_training_config():
    from megatron_lite.models.gpt import GPTConfig
    from megatron_lite.training.config import TrainingConfig, parse_config
    run = parse_config(["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
                        "--fused-kernels", "torch"], GPTConfig)
    assert run.training.fused_kernels == "torch"
    assert TrainingConfig().fused_kernels == "auto"
    with pytest.raises(ConfigError, match="--fused-kernels expects one of 'auto', 'apex', 'torch'"):
        parse_config(["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
                      "--fused-kernels", "fast"], GPTConfig)


def test_auto_picks_apex_where_it_can_run(monkeypatch):
    monkeypatch.setattr(kernels, "apex_unavailable_reason", lambda: None)
    assert kernels.resolve_fused_kernels("auto") == ("apex", None)
    assert kernels.resolve_fused_kernels("apex") == ("apex", None)
    assert kernels.resolve_fused_kernels("torch")[0] == "torch"


def test_models_built_under_apex_use_its_layer_norm(torch_kernels_after):
    from megatron_lite.models.gpt import GPTConfig, GPTModel
    _install_stand_in_apex()
    cfg = GPTConfig(vocab_size=100, num_layers=2, hidden_size=16, num_attention_heads=2,
                    max_position_embeddings=32)
    kernels.use_fused_kernels("apex")
    fused = GPTModel(cfg)
    norms = [m for m in fused.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(type(m) is StandInFusedLayerNorm for m in norms)
    kernels.use_fused_kernels("torch")
    plain = GPTModel(cfg)
    assert all(type(m) is nn.LayerNorm for m in plain.modules() if isinstance(m, nn.LayerNorm))
    # The same parameter names: checkpoints move between the two.
    assert list(fused.state_dict()) == list(plain.state_dict())


def _engine_optimizers(rank, world, ds_json):
    from megatron_lite.models.gpt import GPTConfig, GPTModel
    from megatron_lite.parallel import ParallelState
    from megatron_lite.training.config import TrainingConfig, build_deepspeed_config
    from megatron_lite.training.engine import build_engine
    _install_stand_in_apex()
    cfg = GPTConfig(vocab_size=100, num_layers=1, hidden_size=16, num_attention_heads=2,
                    max_position_embeddings=32)
    tcfg = TrainingConfig(micro_batch_size=1, global_batch_size=1, train_iters=2)
    ps = ParallelState.from_world(1)
    out = {}
    for name in ("zero0", "zero1", "zero2_offload"):
        ds = build_deepspeed_config(tcfg, 1, os.path.join(ds_json, f"{name}.json"))
        engine, skippable = build_engine(GPTModel(cfg, ps), ds, ps, "apex")
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        out[name] = (type(inner).__name__, [c.__name__ for c in type(inner).__mro__],
                     skippable is not None and skippable.overflow is False)
        engine.destroy()
    return out


def test_the_engine_uses_apex_adam_except_under_offload():
    got = run_distributed(_engine_optimizers, 1, os.path.join(ROOT, "configs", "deepspeed"))[0]
    name, mro, skippable = got["zero0"]
    assert name == "SkippableStandInFusedAdam" and skippable  # the plain path can skip a step
    name, mro, skippable = got["zero1"]
    assert name == "StandInFusedAdam" and not skippable      # ZeRO skips overflowed steps itself
    name, mro, _ = got["zero2_offload"]
    assert "StandInFusedAdam" not in mro and "DeepSpeedCPUAdam" in mro  # offloaded states


@pytest.mark.gpu
@pytest.mark.skipif(not _has_real_apex(), reason="needs a CUDA device with NVIDIA apex installed")
def test_apex_kernels_match_torch_kernels_on_cuda(torch_kernels_after):
    from megatron_lite.models.gpt import GPTConfig, GPTModel
    from megatron_lite.parallel import ParallelState, initialize_parameters
    cfg = GPTConfig(vocab_size=500, num_layers=2, hidden_size=64, num_attention_heads=4,
                    max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    tokens = torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(2, 32, device="cuda")}
    results = []
    for kind in ("torch", "apex"):
        kernels.use_fused_kernels(kind)
        model = GPTModel(cfg, ParallelState.single())
        initialize_parameters(model, 1, ParallelState.single())
        model.cuda()
        adam = (kernels.fused_adam_class()(model.parameters(), lr=1e-3, adam_w_mode=True)
                if kind == "apex" else torch.optim.AdamW(model.parameters(), lr=1e-3))
        loss, _ = model.loss(batch)
        loss.backward()
        adam.step()
        results.append((loss.item(), [p.detach().cpu() for p in model.parameters()]))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
