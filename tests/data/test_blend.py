"""Weighted blends of corpora (data/blend.py): the blending index, map-style blends of every
objective, XL streams per corpus, and the one-line errors for bad blends."""
import dataclasses
import os
import re

import numpy as np
import pytest
import torch

from megatron_lite.data.blend import BlendedDataset, BlendingIndex, build_datasets
from megatron_lite.data.objectives.xl_stream import XLStreamBatcher
from megatron_lite.errors import ConfigError
from megatron_lite.models.registry import get_model_spec
from megatron_lite.parallel import ParallelState
from megatron_lite.training.config import parse_config

from tests.data.conftest import ListDataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_counts_stay_within_one_of_weight_times_n():
    rng = np.random.default_rng(0)
    for trial in range(60):
        k = int(rng.integers(1, 9))
        w = rng.random(k) ** 3
        if k > 2 and trial % 3 == 0:
            w[0] = 0.0  # a zero weight is allowed: that corpus is never read
        w = w / w.sum()
        index = BlendingIndex(w)
        owners = index.owners(0, 3000)
        counts = np.cumsum(np.eye(k, dtype=np.int64)[owners], axis=0)
        n = np.arange(1, 3001)[:, None]
        assert np.abs(counts - w[None, :] * n).max() < 1, w
        # Random access agrees with the sequence (counts are kept per block of positions).
        for pos in (0, 1, 4095, 4096, 2999):
            corpus, k_ = index.locate(pos)
            assert corpus == owners[pos] if pos < 3000 else True
        assert list(index.counts(2999)) == list(counts[2998])
    # Deterministic: a fresh index, as a resumed run builds, is the same sequence.
    assert np.array_equal(BlendingIndex([0.3, 0.7]).owners(0, 9000),
                          BlendingIndex([0.3, 0.7]).owners(0, 9000))


class Numbered:
    """A map-style objective stand-in: sample i of corpus `tag` is (tag, i)."""

    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (self.tag, i)


def test_blended_dataset_walks_each_corpus_in_shuffled_epochs():
    a, b = Numbered("a", 5), Numbered("b", 40)
    blend = BlendedDataset([a, b], [0.25, 0.75], ["a", "b"], seed=3)
    samples = [blend[n] for n in range(200)]
    got_a = [i for tag, i in samples if tag == "a"]
    assert len(got_a) == 50
    # Corpus a's 10 epochs: each a permutation of its 5 samples, epoch e as global e*5 + j.
    for e in range(10):
        epoch = got_a[5 * e:5 * e + 5]
        assert sorted(epoch) == list(range(5 * e, 5 * e + 5))
    assert got_a[:5] != sorted(got_a[:5]) or got_a[5:10] != sorted(got_a[5:10])
    assert blend.corpus_epochs(200) == {"a": 10.0, "b": 150 / 40}
    assert blend.ordered


def run_config(*argv, model="gpt"):
    spec = get_model_spec(model)
    return spec, parse_config(list(argv), spec.config_cls, data_config_cls=spec.data_config_cls)


def blend_of(spec, run, tokenizer):
    cfg = dataclasses.replace(run.model, vocab_size=tokenizer.vocab_size)
    return build_datasets(spec.build_data, run, tokenizer, cfg, ParallelState.virtual(1, 0))


@pytest.mark.parametrize("model,tok", [("gpt", "char"), ("t5", "spm"), ("longformer", "bert")])
def test_every_map_style_objective_blends(sample_data, model, tok):
    """causal_lm, T5's span corruption + continuation mixture, whole-word-masked MLM: the blend
    is made of the model's own single-prefix datasets."""
    prefix = getattr(sample_data, f"{tok}_prefix")
    tok_dir = getattr(sample_data, f"{tok}_tokenizer_dir")
    tokenizer = getattr(sample_data, f"{tok}_tokenizer")
    extra = ["--pad-token-id", str(tokenizer.pad_id)] if model == "t5" else []
    spec, run = run_config("--config", os.path.join(ROOT, f"configs/{model}/tiny.yaml"),
                           "--tokenizer", tok_dir, "--seq-length", "64",
                           "--train-data-prefix", "1", prefix, "3", prefix,
                           "--valid-data-prefix", prefix, *extra, model=model)
    data = blend_of(spec, run, tokenizer)
    single = blend_of(spec, dataclasses.replace(
        run, data=dataclasses.replace(run.data, train_data_prefix=prefix)), tokenizer)
    assert isinstance(data.train, BlendedDataset) and data.valid is not None
    for n in range(4):
        corpus, k = data.train.index.locate(n)
        assert corpus == (0 if n == 1 else 1)  # 1:3, earliest deadline first
        sample = data.train[n]
        length = data.train.lengths[corpus]
        epoch, offset = divmod(k, length)
        order = data.train._perm[corpus][1]
        expected = single.train[epoch * length + int(order[offset])]
        assert sample.keys() == expected.keys()
        for key in sample:
            assert torch.equal(sample[key], expected[key]), key


def test_xl_stream_rows_are_assigned_to_one_corpus_each():
    eod = 0
    a = ListDataset([np.arange(1, 40) for _ in range(30)], prefix="a")        # tokens 1..39
    b = ListDataset([np.arange(100, 160) for _ in range(30)], prefix="b")     # tokens 100..159
    parts = [XLStreamBatcher(ds, 2, 16, eod, seed=5, dp_size=2, dp_rank=r, accumulation=2)
             for ds in (a, b) for r in (0, 1)]
    blends = [XLStreamBatcher.blend([parts[r], parts[2 + r]], [0.25, 0.75], ["a", "b"])
              for r in (0, 1)]
    assert blends[0].row_corpus == [1, 0, 1, 1, 1, 0, 1, 1]   # 2 of 8 rows read corpus a
    owner = {}
    for step in range(60):  # past both corpora's epoch ends
        for r, x in enumerate(blends):
            for slot in range(2):
                ids = x.batch(step, slot)["input_ids"]
                for g, row in zip(x.rows(slot), ids):
                    text = row[row != eod]
                    corpus = "a" if int(text.max()) < 100 else "b"
                    assert (text < 100).all() if corpus == "a" else (text >= 100).all()
                    assert owner.setdefault(g, corpus) == corpus  # a row never changes corpus
    # Row 1 (corpus a's first of 2 rows) continues from step to step: the first half of a's
    # stream, in a's own epochs.
    stream_a = blends[0].streams[0]
    x0, x1 = blends[0].batch(0, 0), blends[0].batch(1, 0)
    assert x0["input_ids"][1].tolist() == stream_a.tokens(0, 0, 16).tolist()
    assert x1["input_ids"][1].tolist() == stream_a.tokens(0, 16, 16).tolist()
    # Exact resume: the position is the step, and a blend's state names its weights.
    x = blends[0]
    for _ in range(7):
        next(x)
    fresh = XLStreamBatcher.blend([parts[0], parts[2]], [0.25, 0.75], ["a", "b"])
    fresh.load_state_dict(x.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(next(x).values(), next(fresh).values()))
    other = XLStreamBatcher.blend([parts[0], parts[2]], [0.5, 0.5], ["a", "b"])
    with pytest.raises(ValueError, match="blend weights"):
        other.load_state_dict(x.state_dict())
    assert set(x.corpus_epochs(8 * 30)) == {"a", "b"}
    with pytest.raises(ValueError, match="gets none of the 8 stream rows"):
        XLStreamBatcher.blend([parts[0], parts[2]], [0.05, 0.95], ["a", "b"])


def test_xl_model_data_blends_through_its_builder(sample_data):
    spec, run = run_config("--config", os.path.join(ROOT, "configs/transformer_xl/tiny.yaml"),
                           "--tokenizer", sample_data.char_tokenizer_dir, "--seq-length", "32",
                           "--micro-batch-size", "2", "--global-batch-size", "4",
                           "--train-data-prefix", "0.5", sample_data.char_prefix, "0.5",
                           sample_data.char_valid_prefix, model="transformer_xl")
    data = blend_of(spec, run, sample_data.char_tokenizer)
    assert isinstance(data.train, XLStreamBatcher) and data.train.weights == [0.5, 0.5]
    assert data.train.slots == 2 and data.train.describe().count("stream rows") == 2


def test_bad_blends_are_one_line_errors(sample_data, tmp_path):
    base = ["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
            "--tokenizer", sample_data.char_tokenizer_dir]
    bad = {("0.3x", "a", "0.7", "b"): "weight '0.3x' (before 'a') does not parse",
           ("-1", "a", "2", "b"): "weight -1 of 'a' must be a finite number >= 0",
           ("0", "a", "0", "b"): "every weight is zero",
           ("0.3", "a", "0.7"): "not WEIGHT PREFIX pairs"}
    for words, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as e:
            run_config(*base, "--train-data-prefix", *words)
        assert "\n" not in str(e.value) and "--train-data-prefix" in str(e.value)
    yaml_blend = tmp_path / "blend.yaml"
    yaml_blend.write_text(f"data:\n  train_data_prefix: [0.5, {sample_data.char_prefix}, "
                          f"0.5, {sample_data.char_valid_prefix}]\n")
    _, run = run_config(*base, "--config", str(yaml_blend))
    assert run.data.train_data_prefix.split()[::2] == ["0.5", "0.5"]

    missing = str(tmp_path / "nowhere")
    spec, run = run_config(*base, "--train-data-prefix", "1", sample_data.char_prefix,
                           "1", missing)
    with pytest.raises(ValueError, match=f"--train-data-prefix.*{missing}.idx: no such index"):
        blend_of(spec, run, sample_data.char_tokenizer)
    spec, run = run_config(*base, "--train-data-prefix", "1", sample_data.char_prefix,
                           "1", sample_data.spm_prefix)
    with pytest.raises(ValueError, match="built with tokenizer .* a blend needs one tokenizer"):
        blend_of(spec, run, sample_data.char_tokenizer)
