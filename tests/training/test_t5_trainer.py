"""pretrain_t5.py end to end: resume exactness, TP=2 vs TP=1, MFU counting encoder and decoder
tokens, checkpoint metadata, T5 data flags; and the learning check of configs/t5/tiny.yaml
(the full run is `slow`; `make test` runs its judgement on a briefly trained checkpoint).

Ranks are spawned in-process (gloo) and call `pretrain_t5.main(argv)`."""
import json
import os

import pytest
import torch

from megatron_lite.models.t5 import T5Config, T5DataConfig, t5_flops
from megatron_lite.testing import run_distributed
from megatron_lite.training.config import ConfigError, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs/t5/tiny.yaml")


def t5_args(data, save, *extra, iters=6):
    # Short sequences and a small width keep each run to seconds; grad accumulation 2.
    return ["--config", TINY, "--tokenizer", str(data / "tokenizer"),
            "--train-data-prefix", str(data / "train"), "--valid-data-prefix", str(data / "valid"),
            "--seq-length", "32", "--decoder-seq-length", "16", "--hidden-size", "64",
            "--ffn-hidden-size", "128", "--kv-channels", "16", "--micro-batch-size", "4",
            "--global-batch-size", "8", "--train-iters", str(iters), "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--save", str(save), "--peak-flops", "1e12",
            "--no-progress-bar", "--log-interval", "1", "--eval-interval", "none",
            "--eval-iters", "2", *extra]


def _train(rank, world, argv):
    import pretrain_t5
    return pretrain_t5.main(argv)


def read_metrics(save):
    with open(os.path.join(save, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_is_exact_with_dropout(t5_data, tmp_path):
    full = run_distributed(_train, 1, t5_args(t5_data, tmp_path / "full"))[0]
    part = tmp_path / "part"
    first = run_distributed(_train, 1, t5_args(t5_data, part, "--exit-interval", "3"))[0]
    assert first["step"] == 3 and first["stop_reason"] == "exit_interval"
    second = run_distributed(_train, 1, t5_args(t5_data, part, "--load", str(part)))[0]
    assert second["step"] == 6
    assert first["loss"] + second["loss"] == full["loss"]  # bit-identical
    assert (part / "latest").read_text() == "global_step6"


def test_tp2_follows_tp1_with_mfu_metadata_and_data_flags(t5_data, tmp_path):
    flags = ["--hidden-dropout", "0", "--attention-dropout", "0", "--eval-interval", "3",
             "--continuation-weight", "0.5", "--decoder-start-token-id", "1"]
    tp1 = run_distributed(_train, 1, t5_args(t5_data, tmp_path / "tp1", *flags, iters=3))[0]
    tp2 = run_distributed(_train, 2, t5_args(t5_data, tmp_path / "tp2", *flags,
                                             "--tensor-model-parallel-size", "2", iters=3))
    torch.testing.assert_close(torch.tensor(tp2[0]["loss"]), torch.tensor(tp1["loss"]),
                               rtol=1e-4, atol=0)
    assert tp2[0]["loss"] == tp2[1]["loss"]
    torch.testing.assert_close(torch.tensor(tp2[0]["valid_loss"][-1][1]),
                               torch.tensor(tp1["valid_loss"][-1][1]), rtol=1e-4, atol=0)
    assert tp1["valid_unigram_entropy"] > 0

    meta = torch.load(tmp_path / "tp1" / "global_step3" / "mp_rank_00_model_states.pt",
                      weights_only=True)["megatron_lite"]
    assert meta["model"] == "t5" and meta["model_config"]["num_decoder_layers"] == 3
    assert meta["model_config"]["decoder_start_token_id"] == 1
    assert (tmp_path / "tp1" / "global_step3" / "tokenizer").is_dir()
    meta2 = torch.load(tmp_path / "tp2" / "global_step3" / "mp_rank_01_model_states.pt",
                       weights_only=True)["megatron_lite"]
    assert meta2["tp_size"] == 2 and meta2["partition_spec"]["decoder.relative_attention_bias"] == [1, 1]

    # tokens/s counts encoder + decoder tokens and MFU uses the per-sample FLOPs of both stacks:
    # mfu / tokens_per_sec = (flops per sample / tokens per sample) / peak.
    cfg = T5Config(**meta["model_config"])
    per_token = t5_flops(cfg, 32, 16) / (32 + 16)
    rows = [r for r in read_metrics(tmp_path / "tp1") if "mfu" in r]
    assert len(rows) == 3
    for row in rows:
        assert row["mfu"] / row["tokens_per_sec"] == pytest.approx(per_token / 1e12, rel=1e-9)


def test_t5_config_sections_and_errors(tmp_path):
    run = parse_config(["--config", TINY, "--decoder-seq-length", "48", "--first-sentinel", "0"],
                       T5Config, data_config_cls=T5DataConfig)
    assert run.data.decoder_seq_length == 48 and run.data.first_sentinel == 0
    assert run.model.num_decoder_layers == 3 and run.data.seq_length == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  decoder_seq_lenght: 64\n")
    with pytest.raises(ConfigError, match="decoder_seq_lenght.*did you mean 'decoder_seq_length'"):
        parse_config(["--config", str(bad)], T5Config, data_config_cls=T5DataConfig)
    with pytest.raises(ConfigError, match="unknown flag --continuation-wieght"):
        parse_config(["--continuation-wieght", "1"], T5Config, data_config_cls=T5DataConfig)
    # The GPT data section does not grow T5's keys.
    with pytest.raises(ConfigError, match="decoder_seq_length"):
        parse_config(["--config", TINY], T5Config)
    with pytest.raises(ConfigError, match="noise_density"):
        parse_config(["--noise-density", "0.9"], T5Config, data_config_cls=T5DataConfig)


@pytest.mark.parametrize("name,dims,params_m", [
    # LongLM's table: d_model / d_ff / d_kv / heads / encoder + decoder layers, and #P.
    ("longlm-small", (512, 2048, 64, 8, 6, 6), 60),
    ("longlm-base", (768, 3072, 64, 12, 12, 12), 223),
    ("longlm-large", (1536, 3072, 64, 12, 24, 32), 1000),
])
def test_longlm_configs_have_the_published_shapes(name, dims, params_m):
    run = parse_config(["--config", os.path.join(ROOT, f"configs/t5/{name}.yaml")], T5Config,
                       data_config_cls=T5DataConfig)
    m = run.model
    assert (m.hidden_size, m.ffn_hidden_size, m.kv_channels, m.num_attention_heads,
            m.num_layers, m.decoder_layers) == dims
    assert m.feed_forward_proj == "relu" and m.tie_word_embeddings
    # Parameter count with LongLM's 32128-row vocabulary, within 10% of the published figure.
    from megatron_lite.models.t5 import T5Model
    from megatron_lite.parallel import ParallelState
    import dataclasses
    with torch.device("meta"):
        model = T5Model(dataclasses.replace(m, vocab_size=32128), ParallelState.single())
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.1, n


def test_learning_judgement_runs_on_a_briefly_trained_checkpoint(t5_checkpoint, t5_data):
    """The structure of the acceptance check (the real run is the slow test below)."""
    from benchmarks import t5_learning
    result = t5_learning.judge(str(t5_checkpoint), str(t5_data / "valid"), n_loss=20,
                               n_generate=10, batch_size=10)
    assert result["generated"] == 10 and 0 <= result["ordered"] <= 10
    assert 0 < result["valid_loss"] < 20 and result["unigram_entropy"] > 0
    assert result["margin"] == pytest.approx(result["unigram_entropy"] - result["valid_loss"])
    sentinels = {1: 1, 2: 2, 3: 3}
    assert t5_learning.sentinel_order_ok([1, 9, 2, 9, 3], sentinels, 1)
    assert not t5_learning.sentinel_order_ok([2, 9, 1], sentinels, 1)
    assert not t5_learning.sentinel_order_ok([1, 9, 3, 2], sentinels, 1)
    assert not t5_learning.sentinel_order_ok([], sentinels, 1)


@pytest.mark.slow
def test_tiny_t5_learns_within_its_step_budget(tmp_path):
    """Acceptance: configs/t5/tiny.yaml on the sample corpus, its full step budget."""
    from benchmarks import t5_learning
    result = t5_learning.main(["--work-dir", str(tmp_path)])
    assert result["margin"] >= t5_learning.LOSS_MARGIN, result
    assert result["ordered"] >= t5_learning.MIN_ORDERED, result
