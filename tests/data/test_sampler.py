import pytest
import torch
from torch.utils.data import DataLoader

from megatron_lite.data.objectives import shuffle_rng
from megatron_lite.data.objectives.span_corruption import SpanCorruptionDataset
from megatron_lite.data.objectives.wwm_mlm import WholeWordMaskDataset
from megatron_lite.data.sampler import TrainingSampler, collate

torch.set_num_threads(1)


def take(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


def global_sequence(n, seed, count):
    """The global order written out plainly: epoch by epoch, a seeded permutation each."""
    out = []
    epoch = 0
    while len(out) < count:
        perm = shuffle_rng(seed, epoch, "sample_order").permutation(n)
        out += [epoch * n + int(p) for p in perm]
        epoch += 1
    return out[:count]


def test_ranks_split_the_global_sequence_across_epochs():
    n, mbs, dp, steps = 37, 3, 4, 20  # 20 * 12 = 240 samples: several epochs, ragged edges
    per_rank = [take(TrainingSampler(n, mbs, r, dp, seed=5), steps) for r in range(dp)]
    merged = [i for s in range(steps) for r in range(dp) for i in per_rank[r][s]]
    assert merged == global_sequence(n, 5, steps * mbs * dp)
    # Every epoch visits each sample exactly once.
    for e in range(merged[-1] // n):
        assert sorted(i for i in merged if i // n == e) == list(range(e * n, (e + 1) * n))


def test_resume_at_another_dp_size_continues_the_same_sequence():
    n = 50
    before = [i for b in take(TrainingSampler(n, 2, 0, 1, seed=9), 21) for i in b]  # 42 used
    # Resume with 3 ranks and micro-batch 4 from consumed_samples = 42.
    after = take_all_ranks(n, mbs=4, dp=3, consumed=42, steps=5, seed=9)
    assert before + after == global_sequence(n, 9, 42 + 60)


def take_all_ranks(n, mbs, dp, consumed, steps, seed):
    per_rank = [take(TrainingSampler(n, mbs, r, dp, consumed_samples=consumed, seed=seed), steps)
                for r in range(dp)]
    return [i for s in range(steps) for r in range(dp) for i in per_rank[r][s]]


def test_no_shuffle_is_sequential():
    assert take(TrainingSampler(5, 2, 1, 2, shuffle=False), 3) == [[2, 3], [6, 7], [10, 11]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="dp_rank 2"):
        TrainingSampler(10, 1, 2, 2)
    with pytest.raises(ValueError, match="dataset empty"):
        TrainingSampler(0, 1, 0, 1)


def test_collate_stacks_and_names_mismatches():
    a = {"x": torch.zeros(3), "y": torch.ones(2, 2)}
    b = {"x": torch.ones(3), "y": torch.zeros(2, 2)}
    batch = collate([a, b])
    assert batch["x"].shape == (2, 3) and batch["y"].shape == (2, 2, 2)
    with pytest.raises(ValueError, match="'x'"):
        collate([a, {"x": torch.zeros(4), "y": torch.zeros(2, 2)}])
    with pytest.raises(ValueError, match="keys"):
        collate([a, {"x": torch.zeros(3)}])


@pytest.mark.parametrize("objective", ["span_corruption", "wwm_mlm"])
def test_dataloader_batches_do_not_depend_on_worker_count(sample_data, objective):
    if objective == "span_corruption":
        ds = SpanCorruptionDataset(sample_data.char_ds, sample_data.char_tokenizer, seed=3,
                                   max_source_length=128)
    else:
        ds = WholeWordMaskDataset(sample_data.bert_ds, sample_data.bert_tokenizer, seed=3,
                                  seq_length=128)
    # Start near the end of an epoch so the batches cross into the next one.
    start = len(ds) - 20
    loaders = [DataLoader(ds, batch_sampler=TrainingSampler(len(ds), 4, 1, 2, start, seed=1),
                          collate_fn=collate, num_workers=w) for w in (0, 2)]
    batches = [[b for _, b in zip(range(6), loader)] for loader in loaders]
    for x, y in zip(*batches):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k])
