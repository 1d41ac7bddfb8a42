"""Sequence-classification fine-tuning of a pretrained Longformer (`--model longformer_classifier`
on {"text", "label"} lines): the encoder's weights come from the MLM checkpoint, its head is
dropped and the classification head starts from its init (the log says both), validation reports
accuracy, and bad data or a too-short position table stop with one line. The learning comparison
(majority class, scratch, pretrained) is `slow` (benchmarks/longformer_classify.py).

Every run shares one spawned rank (module fixture): process start-up and DeepSpeed's import cost
more than the tiny steps."""
import contextlib
import io
import json
import math
import os

import pytest
import torch

from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs/longformer/tiny.yaml")
SHAPE = ["--hidden-size", "64", "--ffn-hidden-size", "256", "--attention-window", "32,64",
         "--max-position-embeddings", "128"]


def common(data, save, *extra):
    return ["--config", TINY, "--tokenizer", data.bert_tokenizer_dir, *SHAPE,
            "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--lr", "3e-3", "--lr-warmup-iters", "0", "--save", str(save), "--peak-flops", "1e12",
            "--no-progress-bar", "--log-interval", "1", *extra]


def classify(data, save, load, reviews, *extra):
    # As the recipe does: the model's shape as flags (tiny.yaml's data section is the MLM one).
    return [*common(data, save, "--model", "longformer_classifier", "--num-layers", "2",
                    "--num-attention-heads", "4", "--classify-data", reviews, "--train-iters", "3",
                    "--eval-interval", "3", "--eval-iters", "2")[2:],
            *extra, *(["--load", str(load), "--finetune"] if load else [])]


def _rank(rank, world, pretrain_argv, finetune_argv, scratch_argv, error_calls):
    import pretrain_longformer
    from megatron_lite.checkpoint.checkpointing import read_model_states
    from megatron_lite.errors import ConfigError
    from megatron_lite.models import get_model_spec
    from megatron_lite.training.config import parse_config
    from megatron_lite.training.trainer import Trainer

    with contextlib.redirect_stderr(io.StringIO()):
        pretrain_longformer.main(pretrain_argv)
    spec = get_model_spec("longformer_classifier")

    def trainer(argv):
        run = parse_config(argv, spec.config_cls, data_config_cls=spec.data_config_cls)
        with contextlib.redirect_stderr(io.StringIO()):
            return Trainer(run, spec)

    pretrained, _, _ = read_model_states(pretrain_argv[pretrain_argv.index("--save") + 1], 0)
    scratch = trainer(scratch_argv)
    tuned = trainer(finetune_argv)
    out = {"pretrained": {k: v.clone() for k, v in pretrained.items()},
           "scratch_init": {k: v.clone() for k, v in scratch.engine.module.state_dict().items()},
           "tuned_init": {k: v.clone() for k, v in tuned.engine.module.state_dict().items()},
           "labels": tuned.cfg.labels, "notes": list(tuned.notes)}
    with contextlib.redirect_stderr(io.StringIO()):
        result = tuned.train()
    out["result"] = {k: result[k] for k in ("step", "loss", "valid_loss", "valid_bpc",
                                            "valid_metrics", "valid_unigram_entropy")}
    out["errors"] = []
    for argv in error_calls:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                pretrain_longformer.main(argv)
            out["errors"].append(("ok", None))
        except (ConfigError, ValueError) as e:
            out["errors"].append((type(e).__name__, str(e)))
    return out


def write_lines(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
                    + "\n")
    return str(path)


@pytest.fixture(scope="module")
def runs(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("longformer_classifier")
    with open(os.path.join(os.path.dirname(sample_data.train), "reviews.jsonl"),
              encoding="utf-8") as f:
        reviews = [json.loads(line) for _, line in zip(range(200), f)]
    good = write_lines(root / "reviews.jsonl", reviews)
    unlabelled = write_lines(root / "unlabelled.jsonl", reviews[:5] + [{"text": "没有标签"}])
    unseen = write_lines(root / "unseen.jsonl", reviews[:3] + [{"text": "一般", "label": "mid"}])
    pre = root / "pre"
    pretrain_argv = common(sample_data, pre, "--train-data-prefix", sample_data.bert_prefix,
                           "--train-iters", "3", "--eval-interval", "none")
    errors = [
        classify(sample_data, root / "e1", pre, unlabelled),
        classify(sample_data, root / "e2", pre, good, "--valid-classify-data", unseen),
        classify(sample_data, root / "e3", pre, good, "--seq-length", "256"),
        classify(sample_data, root / "e4", pre, good)[:-1],  # --load without --finetune
    ]
    (out,) = run_distributed(_rank, 1, pretrain_argv, classify(sample_data, root / "ft", pre, good),
                             classify(sample_data, root / "scratch", None, good), errors)
    out["good"], out["ft_save"] = good, str(root / "ft")
    return out


def test_finetuning_starts_from_the_encoder_and_a_fresh_head(runs):
    pretrained, tuned, scratch = runs["pretrained"], runs["tuned_init"], runs["scratch_init"]
    shared = set(pretrained) & set(tuned)
    assert any(k.startswith("layers.") for k in shared) and "word_embeddings.weight" in shared
    for k in shared:  # every encoder tensor is the checkpoint's, bit for bit
        assert torch.equal(tuned[k], pretrained[k]), k
    head = sorted(set(tuned) - set(pretrained))
    assert head == ["classifier.dense.bias", "classifier.dense.weight", "classifier.out.bias",
                    "classifier.out.weight"]
    for k in head:  # the head is the model's own init (the same seed from scratch)
        assert torch.equal(tuned[k], scratch[k]), k
    assert not torch.equal(tuned["word_embeddings.weight"], scratch["word_embeddings.weight"])
    (note,) = [n for n in runs["notes"] if "initialised fresh" in n]
    assert "lm_head_bias" in note and "classifier.out.weight" in note and "'longformer'" in note


def test_finetuning_trains_and_reports_accuracy(runs):
    result = runs["result"]
    assert runs["labels"] == ["neg", "pos"]  # from the training lines, sorted
    assert result["step"] == 3 and all(math.isfinite(x) for x in result["loss"])
    (step, metrics), = result["valid_metrics"]
    assert step == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    # Predicting classes, not text: no bits per character; the unigram baseline is the entropy
    # of the class prior, at most ln 2 for two classes.
    assert result["valid_bpc"] == [(3, None)]
    assert 0.0 < result["valid_unigram_entropy"] <= math.log(2) + 1e-9


def test_accuracy_counts_the_argmax_over_the_examples():
    from megatron_lite.models.longformer import (LongformerClassifier, LongformerClassifierConfig,
                                                 classifier_accuracy)
    torch.manual_seed(0)
    cfg = LongformerClassifierConfig(vocab_size=50, num_layers=1, hidden_size=16,
                                     num_attention_heads=2, ffn_hidden_size=32,
                                     attention_window=[4], max_position_embeddings=16,
                                     hidden_dropout=0.0, attention_dropout=0.0,
                                     labels=["a", "b", "c"])
    model = LongformerClassifier(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    batch = {"input_ids": torch.randint(0, 50, (6, 10)),
             "attention_mask": torch.ones(6, 10, dtype=torch.long),
             "global_attention_mask": torch.zeros(6, 10, dtype=torch.long)}
    predicted = model(**batch).argmax(-1)
    batch["labels"] = predicted.clone()
    batch["labels"][:2] = (predicted[:2] + 1) % 3  # two wrong
    assert classifier_accuracy(model, batch) == {"accuracy": (4.0, 6.0)}


@pytest.mark.parametrize("case, words", [
    (0, ["unlabelled.jsonl:6", "no label"]),
    (1, ["unseen.jsonl:4", "'mid'", "neg, pos"]),
    (2, ["--seq-length 256", "max_position_embeddings=128", "convert_to_long.py"]),
    (3, ["'longformer' model", "--finetune"]),
])
def test_bad_input_is_one_line_naming_the_place_and_the_fix(runs, case, words):
    status, message = runs["errors"][case]
    assert status != "ok" and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_benchmark_scores_the_trainers_held_out_split(runs):
    """benchmarks/longformer_classify.py's scoring, on the briefly tuned checkpoint: over the
    first 8 held-out lines (the 2 x 4 the trainer evaluated) it must agree with the trainer."""
    from benchmarks import longformer_classify
    (_, metrics), = runs["result"]["valid_metrics"]
    scored = longformer_classify.held_out_accuracy(runs["ft_save"], runs["good"], max_examples=8)
    assert scored["examples"] == 8 and scored["step"] == 3
    assert scored["accuracy"] == metrics["accuracy"]
    assert scored["majority_label"] in ("neg", "pos") and 0.0 <= scored["majority"] <= 1.0


@pytest.mark.slow
def test_pretraining_helps_the_tiny_classifier(tmp_path):
    """Acceptance: on the reviews' held-out split the pretrained tiny Longformer is at least as
    accurate as the one from scratch, and both beat the majority class by 15 points."""
    from benchmarks import longformer_classify
    result = longformer_classify.main(["--work-dir", str(tmp_path)])
    assert result["passed"] == {"scratch": True, "pretrained": True}, result
