"""Config layer: YAML + flags -> dataclasses, and the DeepSpeed engine config built from them."""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import typing
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import torch
import yaml

from megatron_lite.testing import run_distributed
from megatron_lite.training import config as C
from megatron_lite.training.config import (ConfigError, DataConfig, TrainingConfig,
                                           build_deepspeed_config, check_batch_sizes, flag_name,
                                           parse_config)

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS_DIR = os.path.join(ROOT, "configs", "deepspeed")


@dataclass
class TinyModel:
    """A stand-in for any model config dataclass (GPTConfig, T5Config, ...)."""
    num_layers: int = 2
    """Blocks."""
    hidden_size: int = 64
    """Width."""
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.1
    activation: Literal["gelu", "relu"] = "gelu"
    name: Optional[str] = None
    sparse_attention: bool = False
    window_sizes: tuple[int, ...] = (8, 16)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")


@dataclass
class RequiredModel:
    vocab_size: int
    num_layers: int = 1


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def write_json(tmp_path, cfg, name="ds.json"):
    return write(tmp_path, name, json.dumps(cfg))


# ---------------------------------------------------------------------------------------------
# parse_config
# ---------------------------------------------------------------------------------------------

def test_defaults_without_yaml_or_flags():
    run = parse_config([], TinyModel)
    assert run.model == TinyModel()
    assert run.data == DataConfig()
    assert run.training == TrainingConfig()
    assert (run.deepspeed, run.deepspeed_config, run.local_rank, run.config_path) == \
        (False, None, None, None)


def test_precedence_defaults_yaml_config_cli(tmp_path):
    base = write(tmp_path, "base.yaml", "model:\n  num_layers: 3\n  hidden_size: 96\n"
                 "training:\n  lr: 2.0e-3\n  train_iters: 50\n")
    cfg = write(tmp_path, "run.yaml", "model:\n  num_layers: 4\n"
                "training:\n  train_iters: 70\n  save: ckpt\n")
    run = parse_config(["--config", cfg, "--train-iters", "90", "--seq-length", "32"],
                       TinyModel, defaults_yaml=base)
    assert run.model.num_layers == 4          # --config over defaults_yaml
    assert run.model.hidden_size == 96        # defaults_yaml over the dataclass
    assert run.model.num_attention_heads == 4  # dataclass default
    assert run.training.lr == 2e-3
    assert run.training.train_iters == 90     # flag over both files
    assert run.data.seq_length == 32
    assert run.training.save == "ckpt"
    assert run.training.log_dir == os.path.join("ckpt", "logs")
    assert run.config_path == cfg


def test_empty_sections_and_empty_file(tmp_path):
    run = parse_config(["--config", write(tmp_path, "e.yaml", "model:\ntraining:\n")], TinyModel)
    assert run.training == TrainingConfig()
    run = parse_config(["--config", write(tmp_path, "empty.yaml", "")], TinyModel)
    assert run.model == TinyModel()


def _non_default(section, field, tp):
    """A valid value different from the field's default, as (flag args, expected value)."""
    special = {("model", "num_attention_heads"): (["8"], 8),
               ("training", "min_lr"): (["5e-4"], 5e-4),
               ("training", "finetune"): (["--finetune", "--load", "ck"], True),
               ("training", "adam_beta1"): (["0.8"], 0.8),
               ("training", "adam_beta2"): (["0.99"], 0.99)}
    flag = flag_name(field.name)
    if (section, field.name) in special:
        args, value = special[(section, field.name)]
        return (args if args[0].startswith("--") else [flag] + args), value
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    inner, _ = C._unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if inner is bool:
        return ([f"--no-{flag[2:]}"] if default else [flag]), not default
    if origin is Literal:
        value = next(c for c in typing.get_args(inner) if c != default)
        return [flag, value], value
    if origin is tuple:
        return [flag, "3,5,7"], (3, 5, 7)
    if inner is int:
        value = 2 * default + 4 if default is not None else 7
        return [flag, str(value)], value
    if inner is float:
        value = default / 2 if default else 0.25
        return [flag, repr(value)], value
    return [flag, "some/path"], "some/path"


def test_every_field_is_a_flag():
    classes = {"model": TinyModel, "data": DataConfig, "training": TrainingConfig}
    for section, cls in classes.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            args, expected = _non_default(section, field, hints[field.name])
            run = parse_config(args, TinyModel)
            got = getattr(getattr(run, section), field.name)
            assert got == expected, (section, field.name, args)
            assert got != getattr(getattr(parse_config([], TinyModel), section), field.name)


def test_fields_match_the_contract():
    # Other modules code against these names (docs/ARCHITECTURE.md, the trainer).
    assert [f.name for f in dataclasses.fields(DataConfig)] == [
        "train_data_prefix", "valid_data_prefix", "tokenizer", "seq_length", "reset_position_ids",
        "reset_attention_mask", "eod_mask_loss", "num_workers", "finetune_data", "truncate"]
    assert [f.name for f in dataclasses.fields(TrainingConfig)] == [
        "micro_batch_size", "global_batch_size", "train_iters", "exit_interval", "lr", "min_lr",
        "lr_warmup_iters", "lr_decay_style", "lr_decay_iters", "weight_decay", "adam_beta1",
        "adam_beta2", "adam_eps", "clip_grad", "seed", "tensor_model_parallel_size",
        "sequence_parallel_size", "save", "save_interval", "load", "finetune", "load_fallback",
        "keep_last",
        "eval_interval", "eval_iters", "log_interval", "log_dir", "checkpoint_activations",
        "max_skipped_steps", "peak_flops", "no_progress_bar", "cpu_optimizer",
        "reset_stream_state", "fused_kernels", "compile"]


def test_bool_flags(tmp_path):
    cfg = write(tmp_path, "b.yaml", "training:\n  checkpoint_activations: true\n"
                "data:\n  eod_mask_loss: true\n")
    run = parse_config(["--config", cfg, "--no-checkpoint-activations", "--reset-position-ids"],
                       TinyModel)
    assert run.training.checkpoint_activations is False
    assert run.data.eod_mask_loss is True
    assert run.data.reset_position_ids is True
    assert parse_config(["--sparse-attention"], TinyModel).model.sparse_attention is True
    with pytest.raises(ConfigError, match="--sparse-attention"):
        parse_config(["--sparse-attention=yes"], TinyModel)


def test_optional_fields_accept_none(tmp_path):
    cfg = write(tmp_path, "n.yaml", "training:\n  lr_decay_iters: 40\n  save: out\n"
                "model:\n  ffn_hidden_size: 128\n")
    run = parse_config(["--config", cfg, "--lr-decay-iters", "none", "--save", "None",
                        "--ffn-hidden-size", "none"], TinyModel)
    assert run.training.lr_decay_iters is None
    assert run.training.save is None and run.training.log_dir is None
    assert run.model.ffn_hidden_size is None
    yml = write(tmp_path, "n2.yaml", "training:\n  keep_last: null\n")
    assert parse_config(["--config", yml], TinyModel).training.keep_last is None
    with pytest.raises(ConfigError, match=r"--train-iters expects an integer, got 'none'"):
        parse_config(["--train-iters", "none"], TinyModel)


def test_yaml_float_without_dot_and_int_for_float(tmp_path):
    # PyYAML reads 1e-3 as a string; a float field must still take it.
    cfg = write(tmp_path, "f.yaml", "training:\n  lr: 1e-3\n  min_lr: 0\n  peak_flops: 2e12\n")
    run = parse_config(["--config", cfg], TinyModel)
    assert run.training.lr == 1e-3 and isinstance(run.training.min_lr, float)
    assert run.training.peak_flops == 2e12


def test_unknown_yaml_key_names_file_section_key_and_suggestion(tmp_path):
    cfg = write(tmp_path, "m.yaml", "model:\n  hidden_size: 64\n  num_layer: 2\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", cfg], TinyModel)
    assert str(e.value) == (f"{cfg}: unknown key 'num_layer' in section 'model'; "
                            f"did you mean 'num_layers'? (line 3)")
    cfg = write(tmp_path, "t.yaml", "training:\n  zzzz: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'zzzz' in section 'training'; valid: "
                                          r"micro_batch_size, global_batch_size"):
        parse_config(["--config", cfg], TinyModel)


def test_unknown_section(tmp_path):
    cfg = write(tmp_path, "s.yaml", "modle:\n  num_layers: 2\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", cfg], TinyModel)
    assert str(e.value) == f"{cfg}: unknown section 'modle'; did you mean 'model'? (line 1)"
    cfg = write(tmp_path, "l.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping with sections model, data"):
        parse_config(["--config", cfg], TinyModel)
    cfg = write(tmp_path, "v.yaml", "training: 3\n")
    with pytest.raises(ConfigError, match="section 'training' must be a mapping"):
        parse_config(["--config", cfg], TinyModel)


def test_duplicate_yaml_key(tmp_path):
    cfg = write(tmp_path, "d.yaml", "training:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"d.yaml:3: duplicate key 'lr' \(first set on line 2\)"):
        parse_config(["--config", cfg], TinyModel)


def test_missing_or_invalid_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        parse_config(["--config", str(tmp_path / "nope.yaml")], TinyModel)
    cfg = write(tmp_path, "bad.yaml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        parse_config(["--config", cfg], TinyModel)


def test_unknown_flag_suggests_the_nearest():
    with pytest.raises(ConfigError) as e:
        parse_config(["--train-iter", "5"], TinyModel)
    assert str(e.value) == "command line: unknown flag --train-iter; did you mean '--train-iters'?"
    # No prefix matching: a truncated flag must not silently mean a longer one.
    with pytest.raises(ConfigError, match="unknown flag --hidden-siz;"):
        parse_config(["--hidden-siz=64"], TinyModel)
    with pytest.raises(ConfigError, match=r"unknown flag --qqqqqqqq \(see --help\)"):
        parse_config(["--qqqqqqqq"], TinyModel)
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_config(["stray"], TinyModel)
    with pytest.raises(ConfigError, match="--lr: expected one argument"):
        parse_config(["--lr"], TinyModel)


def test_bad_types_name_key_value_and_type(tmp_path):
    cfg = write(tmp_path, "t.yaml", "model:\n  hidden_size: wide\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", cfg], TinyModel)
    assert str(e.value) == (f"{cfg}: key 'hidden_size' in section 'model' (line 2): "
                            f"expected an integer, got 'wide'")
    cfg = write(tmp_path, "b.yaml", "training:\n  finetune: 'yes'\n")
    with pytest.raises(ConfigError, match="key 'finetune' .* expected a boolean, got 'yes'"):
        parse_config(["--config", cfg], TinyModel)
    cfg = write(tmp_path, "f.yaml", "model:\n  num_layers: 2.5\n")
    with pytest.raises(ConfigError, match="expected an integer, got 2.5"):
        parse_config(["--config", cfg], TinyModel)
    with pytest.raises(ConfigError, match="--lr expects a number, got 'fast'"):
        parse_config(["--lr", "fast"], TinyModel)
    with pytest.raises(ConfigError, match=r"--lr-decay-style expects one of 'linear', 'cosine', "
                                          r"'constant', got 'exp'"):
        parse_config(["--lr-decay-style", "exp"], TinyModel)
    with pytest.raises(ConfigError, match=r"--window-sizes expects a list \(comma-separated on the "
                                          r"command line\), each item an integer, got '8,x'"):
        parse_config(["--window-sizes", "8,x"], TinyModel)


def test_model_validation_error_names_the_config_file(tmp_path):
    cfg = write(tmp_path, "v.yaml", "model:\n  hidden_size: 66\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", cfg], TinyModel)
    assert str(e.value) == (f"{cfg}: invalid model config: hidden_size 66 is not divisible by "
                            f"num_attention_heads 4")
    with pytest.raises(ConfigError, match=r"v.yaml \+ command line: invalid model config"):
        parse_config(["--config", cfg, "--num-layers", "3"], TinyModel)
    with pytest.raises(ConfigError, match="command line: invalid training config: need 0 <= "
                                          "min_lr <= lr"):
        parse_config(["--min-lr", "1", "--lr", "0.1"], TinyModel)
    with pytest.raises(ConfigError, match="finetune loads weights from `load`"):
        parse_config(["--finetune"], TinyModel)


def test_required_model_field():
    with pytest.raises(ConfigError, match="section 'model' needs vocab_size: .* --vocab-size"):
        parse_config([], RequiredModel)
    assert parse_config(["--vocab-size", "100"], RequiredModel).model.vocab_size == 100


def test_flag_names_are_unique_across_sections():
    @dataclass
    class Clashing:
        seq_length: int = 3

    with pytest.raises(AssertionError, match="--seq-length of data.seq_length is already taken "
                                             "by model.seq_length"):
        parse_config([], Clashing)

    @dataclass
    class ClashingLauncher:
        local_rank: int = 0

    with pytest.raises(AssertionError, match="--local-rank .* already taken by launcher"):
        parse_config([], ClashingLauncher)


def test_deepspeed_launcher_arguments():
    run = parse_config(["--local_rank=1", "--deepspeed", "--deepspeed_config", "ds.json"],
                       TinyModel)
    assert (run.deepspeed, run.deepspeed_config, run.local_rank) == (True, "ds.json", 1)
    run = parse_config(["--deepspeed-config", "x.json", "--local-rank", "0"], TinyModel)
    assert (run.deepspeed, run.deepspeed_config, run.local_rank) == (False, "x.json", 0)


def test_to_dict_round_trips_through_yaml(tmp_path):
    run = parse_config(["--num-layers", "3", "--lr", "3e-4", "--save", "s", "--window-sizes",
                        "4,4", "--truncate", "reject"], TinyModel)
    d = run.to_dict()
    d["model"]["window_sizes"] = list(d["model"]["window_sizes"])   # YAML has no tuples
    again = parse_config(["--config", write(tmp_path, "r.yaml", yaml.safe_dump(d))], TinyModel)
    assert (again.model, again.data, again.training) == (run.model, run.data, run.training)


def test_field_docstrings_become_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--help"], TinyModel)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Peak learning rate, reached at the end of warmup." in out
    assert "--no-checkpoint-activations" in out and "--num-layers" in out


def test_check_batch_sizes():
    t = TrainingConfig(micro_batch_size=2, global_batch_size=12)
    assert check_batch_sizes(t, 1) == 6
    assert check_batch_sizes(t, 3) == 2
    with pytest.raises(ConfigError) as e:
        check_batch_sizes(t, 4)
    msg = str(e.value)
    assert "global batch size 12" in msg and "micro batch size 2" in msg
    assert "data-parallel size 4" in msg


# ---------------------------------------------------------------------------------------------
# build_deepspeed_config
# ---------------------------------------------------------------------------------------------

def _scheduler_lrs(ds_cfg, lr, iterations):
    """The rates DeepSpeed's configured scheduler gives at iterations -1, 0, ..., built the way
    the engine builds it (deepspeed/runtime/engine.py `_scheduler_from_config`)."""
    from deepspeed.runtime import lr_schedules
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    cls = getattr(lr_schedules, ds_cfg["scheduler"]["type"])
    sched = cls(opt, **ds_cfg["scheduler"]["params"])
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(iterations):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def _expected_lr(style, i, lr, min_lr, warmup, decay):
    w = max(2, warmup)
    if style == "constant":
        if warmup == 0:
            return lr
        return lr * max(i, 0) / w if i < w else lr
    if style == "linear":
        if i < w:
            return min_lr + (lr - min_lr) * max(i, 0) / w
        return min_lr + (lr - min_lr) * max(0.0, (decay - i) / (decay - w))
    if i < w:
        return lr * max(i, 0) / w
    p = min(1.0, (i - w + 1) / (decay - w))
    r = min_lr / lr
    return lr * (r + (1 - r) * (1 + math.cos(math.pi * p)) / 2)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 4])
def test_lr_schedule_injection(style, warmup):
    lr, min_lr, decay = 3e-3, 3e-4, 20
    t = TrainingConfig(lr=lr, min_lr=min_lr, lr_warmup_iters=warmup, lr_decay_style=style,
                       train_iters=30, lr_decay_iters=decay)
    cfg = build_deepspeed_config(t, 1, None)
    expected_type = {"constant": "WarmupLR", "linear": "WarmupDecayLR",
                     "cosine": "WarmupCosineLR"}[style]
    assert cfg["scheduler"]["type"] == expected_type
    lrs = _scheduler_lrs(cfg, lr, 30)
    for i, got in enumerate(lrs, start=-1):
        assert got == pytest.approx(_expected_lr(style, i, lr, min_lr, warmup, decay),
                                    rel=1e-9, abs=1e-15), (style, warmup, i)
    if style == "cosine":
        # DeepSpeed's cosine starts decaying one iteration early and never hits the peak.
        assert lr * (max(2, warmup) - 1) / max(2, warmup) <= max(lrs) < lr
    else:
        assert max(lrs) == pytest.approx(lr)
    if style != "constant":
        assert lrs[decay + 1] == pytest.approx(min_lr)   # iteration D: the decay has ended
        assert lrs[-1] == pytest.approx(min_lr)          # and stays at min_lr past it
    if style == "constant" and warmup == 0:
        assert all(x == lr for x in lrs)


def test_lr_decay_iters_defaults_to_train_iters():
    t = TrainingConfig(train_iters=17, lr_warmup_iters=3)
    assert build_deepspeed_config(t, 1, None)["scheduler"]["params"]["total_num_steps"] == 17
    with pytest.raises(ConfigError, match=r"lr_decay_iters \(3\) must be at least "
                                          r"lr_warmup_iters \(4\)"):
        build_deepspeed_config(TrainingConfig(train_iters=3, lr_warmup_iters=4), 1, None)


def test_batch_optimizer_and_clipping_injection(tmp_path):
    t = TrainingConfig(micro_batch_size=2, global_batch_size=16, clip_grad=0.5, lr=2e-4,
                       adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-6, weight_decay=0.1)
    cfg = build_deepspeed_config(t, 2, os.path.join(DS_DIR, "zero2.json"))
    assert cfg["train_batch_size"] == 16
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"] == {"type": "AdamW", "params": {
        "lr": 2e-4, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1, "torch_adam": True,
        "fused": True}}
    assert cfg["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="global batch size 16 .* data-parallel size 3"):
        build_deepspeed_config(t, 3, None)


def test_default_config_is_zero0_and_not_shared():
    with open(os.path.join(DS_DIR, "zero0.json")) as f:
        assert json.load(f) == C.DEFAULT_DEEPSPEED_CONFIG
    cfg = build_deepspeed_config(TrainingConfig(), 1, None)
    cfg["zero_optimization"]["stage"] = 3
    assert C.DEFAULT_DEEPSPEED_CONFIG["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize("key", sorted(C._OWNED_KEYS))
def test_owned_key_in_json_is_an_error(tmp_path, key):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 1}, key: 8})
    with pytest.raises(ConfigError) as e:
        build_deepspeed_config(TrainingConfig(), 1, path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: '{key}' is set by our training config")
    owner = {"train_batch_size": "--global-batch-size / training.global_batch_size",
             "train_micro_batch_size_per_gpu": "--micro-batch-size / training.micro_batch_size",
             "gradient_accumulation_steps": "--global-batch-size and --micro-batch-size",
             "gradient_clipping": "--clip-grad / training.clip_grad",
             "optimizer": "--lr, --weight-decay",
             "scheduler": "--lr-decay-style, --lr-warmup-iters"}[key]
    assert f"set {owner}" in msg


CURRENT_FORM = '"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", ' \
               '"pin_memory": true}}'


@pytest.mark.parametrize("cfg, what", [
    ({"zero_optimization": {"stage": 2}, "offload_optimizer": {"device": "cpu"}},
     "a top-level 'offload_optimizer' block is ignored"),
    ({"zero_optimization": {"stage": 3}, "offload_param": {"device": "cpu"}},
     "a top-level 'offload_param' block is ignored"),
    ({"zero_optimization": {"stage": 2, "cpu_offload": True}},
     "zero_optimization.cpu_offload is DeepSpeed's deprecated"),
    ({"zero_optimization": {"stage": 3, "cpu_offload_params": True}},
     "zero_optimization.cpu_offload_params is DeepSpeed's deprecated"),
    ({"zero_optimization": {"stage": 3, "cpu_offload_param": True}},
     "zero_optimization.cpu_offload_param is DeepSpeed's deprecated"),
])
def test_misplaced_or_legacy_offload(tmp_path, cfg, what):
    path = write_json(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        build_deepspeed_config(TrainingConfig(), 1, path)
    assert str(e.value).startswith(f"{path}: {what}")
    assert CURRENT_FORM in str(e.value)


def test_offload_needs_the_right_stage(tmp_path):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 2, "offload_param": {
        "device": "cpu"}}})
    with pytest.raises(ConfigError, match="offload_param needs ZeRO stage 3 \\(stage is 2\\)"):
        build_deepspeed_config(TrainingConfig(), 1, path)
    path = write_json(tmp_path, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(ConfigError, match="offload_optimizer needs ZeRO stage 1, 2 or 3"):
        build_deepspeed_config(TrainingConfig(), 1, path)
    path = write_json(tmp_path, {"zero_optimization": True})
    with pytest.raises(ConfigError, match="legacy form"):
        build_deepspeed_config(TrainingConfig(), 1, path)


def test_cpu_optimizer_and_offload():
    offload = os.path.join(DS_DIR, "zero2_offload.json")
    for cpu_optimizer in (False, True):
        cfg = build_deepspeed_config(TrainingConfig(cpu_optimizer=cpu_optimizer), 1, offload)
        # DeepSpeed swaps in its CPU Adam for "AdamW" under offload; torch_adam would override it.
        assert "torch_adam" not in cfg["optimizer"]["params"]
    with pytest.raises(ConfigError, match="cpu_optimizer needs ZeRO-Offload"):
        build_deepspeed_config(TrainingConfig(cpu_optimizer=True), 1,
                               os.path.join(DS_DIR, "zero2.json"))


def test_zero_with_nothing_to_partition_is_noted():
    """ZeRO at one data-parallel rank, nothing offloaded: the log points to the plain path."""
    def note(name, dp):
        return C.zero_on_one_rank_note(build_deepspeed_config(
            TrainingConfig(micro_batch_size=1, global_batch_size=dp), dp,
            os.path.join(DS_DIR, f"{name}.json")), dp)
    assert "ZeRO stage 1 at data-parallel size 1" in note("zero1", 1)
    assert "configs/deepspeed/zero0.json" in note("zero2", 1)
    assert note("zero1", 2) is None and note("zero0", 1) is None
    assert note("zero2_offload", 1) is None  # offloading is what ZeRO-Offload is for


def test_precision_checks_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "_has_cuda", lambda: False)
    fp16 = os.path.join(DS_DIR, "zero2_fp16.json")
    with pytest.raises(ConfigError, match="zero2_fp16.json: fp16 needs a GPU .* fp32 config"):
        build_deepspeed_config(TrainingConfig(), 1, fp16)
    bf16 = os.path.join(DS_DIR, "zero2_bf16.json")
    monkeypatch.setattr(C, "_cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 on a CPU without native bf16 matmul"):
        cfg = build_deepspeed_config(TrainingConfig(), 1, bf16)
    assert cfg["bf16"] == {"enabled": True}
    monkeypatch.setattr(C, "_cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_deepspeed_config(TrainingConfig(), 1, bf16)
    monkeypatch.setattr(C, "_has_cuda", lambda: True)
    assert build_deepspeed_config(TrainingConfig(), 1, fp16)["fp16"]["enabled"] is True


def test_bad_json_files(tmp_path):
    path = write(tmp_path, "broken.json", '{\n  "zero_optimization": {"stage": 1},\n  oops\n}')
    with pytest.raises(ConfigError, match=r"broken.json:3: not valid JSON"):
        build_deepspeed_config(TrainingConfig(), 1, path)
    path = write(tmp_path, "dup.json", '{"wall_clock_breakdown": false, '
                 '"wall_clock_breakdown": true}')
    with pytest.raises(ConfigError, match="dup.json: duplicate key"):
        build_deepspeed_config(TrainingConfig(), 1, path)
    with pytest.raises(ConfigError, match="cannot read DeepSpeed config"):
        build_deepspeed_config(TrainingConfig(), 1, str(tmp_path / "missing.json"))
    path = write(tmp_path, "list.json", "[1]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        build_deepspeed_config(TrainingConfig(), 1, path)


def test_every_shipped_json_parses_in_deepspeed(monkeypatch):
    from deepspeed.runtime.config import DeepSpeedConfig
    # The fp16 files are for GPUs; pretend to be on one so the injection runs everywhere.
    monkeypatch.setattr(C, "_has_cuda", lambda: True)
    paths = sorted(glob.glob(os.path.join(DS_DIR, "*.json")))
    names = {os.path.basename(p)[:-5] for p in paths}
    assert {"zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"} <= names
    assert {f"zero{s}_{d}" for s in (1, 2, 3) for d in ("fp16", "bf16")} <= names
    t = TrainingConfig(micro_batch_size=2, global_batch_size=6, lr_decay_style="cosine")
    for path in paths:
        name = os.path.basename(path)[:-5]
        raw = json.load(open(path))
        assert not set(raw) & set(C._OWNED_KEYS), name   # engine choices only
        ds = DeepSpeedConfig(build_deepspeed_config(t, 1, path))
        stage = int(name[4])
        assert ds.zero_optimization_stage == stage, name
        assert ds.float16_config.enabled == name.endswith("_fp16"), name
        assert ds.bfloat16_config.enabled == name.endswith("_bf16"), name
        assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu,
                ds.gradient_accumulation_steps) == (6, 2, 3), name
        assert ds.optimizer_name == "adamw" and ds.scheduler_name == "WarmupCosineLR", name
        offload_opt = ds.zero_config.offload_optimizer
        offload_param = ds.zero_config.offload_param
        assert (offload_opt is not None and offload_opt.device == "cpu") == \
            name.endswith("_offload"), name
        assert (offload_param is not None and offload_param.device == "cpu") == \
            (name == "zero3_offload"), name
        if name.endswith("_offload"):
            assert offload_opt.pin_memory, name
        if name.endswith("_fp16"):
            assert ds.float16_config.loss_scale == 0                 # dynamic
            assert ds.float16_config.initial_scale_power == 16
            assert ds.float16_config.hysteresis == 2
        if stage == 3:
            assert ds.zero_config.gather_16bit_weights_on_model_save, name


def _train_with_injected_config(rank, world_size, path):
    import deepspeed
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    t = TrainingConfig(micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-3,
                       lr_warmup_iters=2, lr_decay_style="linear", train_iters=6,
                       adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-7, weight_decay=0.05)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config=build_deepspeed_config(t, world_size, path))
    group = engine.optimizer.param_groups[0]
    info = dict(optimizer=type(engine.optimizer).__name__, scheduler=type(scheduler).__name__,
                betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                grad_acc=engine.gradient_accumulation_steps(), clip=engine.gradient_clipping(),
                lrs=[])
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(4 * info["grad_acc"]):
        info["lrs"].append(engine.get_lr()[0])   # the rate the next optimizer step uses
        loss = (engine(x) ** 2).mean()
        engine.backward(loss)
        engine.step()
    return info


def test_engine_takes_the_injected_config():
    (info,) = run_distributed(_train_with_injected_config, 1, os.path.join(DS_DIR, "zero0.json"))
    assert info["optimizer"] == "AdamW"              # torch.optim.AdamW via torch_adam
    assert info["scheduler"] == "WarmupDecayLR"
    assert info["betas"] == (0.8, 0.9) and info["eps"] == 1e-7
    assert info["weight_decay"] == 0.05
    assert info["grad_acc"] == 2 and info["clip"] == 1.0
    # Micro-steps within an optimizer step share a rate; step k runs at iteration k - 1.
    lr, min_lr, w, d = 1e-2, 1e-3, 2, 6
    expected = [_expected_lr("linear", k - 1, lr, min_lr, w, d) for k in range(4)]
    assert info["lrs"][::2] == pytest.approx(expected)
    assert info["lrs"][1::2] == pytest.approx(expected)
