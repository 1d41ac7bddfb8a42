import numpy as np
import pytest
import torch

from megatron_lite.data.objectives.xl_stream import XLStreamBatcher

torch.set_num_threads(1)


def stream_of(ds, batcher, epoch, eod):
    order = batcher.stream.document_order(epoch)
    return np.concatenate([np.concatenate([np.asarray(ds[int(d)], dtype=np.int64), [eod]])
                           for d in order])


def test_rows_are_contiguous_streams_of_the_text(sample_data):
    ds, eod = sample_data.char_ds, sample_data.char_tokenizer.eod_id
    b, seq = 3, 256
    xl = XLStreamBatcher(ds, b, seq, eod, seed=11)
    steps = len(xl)
    assert steps > 100
    stream = stream_of(ds, xl, 0, eod)
    row_len = len(stream) // b
    batches = [xl.batch(t) for t in range(steps)]
    for row in range(b):
        # Each step continues the previous one: inputs concatenated over steps are the row's
        # slice of the stream, and each step's labels are its inputs shifted by one.
        inputs = torch.cat([x["input_ids"][row] for x in batches]).numpy()
        assert np.array_equal(inputs, stream[row * row_len:row * row_len + steps * seq])
        for x in batches[:5]:
            assert torch.equal(x["labels"][row, :-1], x["input_ids"][row, 1:])
    # The next epoch starts every row afresh in a new document order.
    nxt = xl.batch(steps)["input_ids"][0].numpy()
    assert np.array_equal(nxt, stream_of(ds, xl, 1, eod)[:seq])


def test_dp_ranks_hold_slices_of_the_global_batch(sample_data):
    ds, eod = sample_data.char_ds, sample_data.char_tokenizer.eod_id
    whole = XLStreamBatcher(ds, 4, 64, eod, seed=2)
    ranks = [XLStreamBatcher(ds, 2, 64, eod, seed=2, dp_rank=r, dp_size=2) for r in range(2)]
    for t in (0, 1, 57):
        for key in ("input_ids", "labels"):
            merged = torch.cat([r.batch(t)[key] for r in ranks])
            assert torch.equal(merged, whole.batch(t)[key])


def test_position_is_saved_and_restored(sample_data):
    ds, eod = sample_data.char_ds, sample_data.char_tokenizer.eod_id
    xl = XLStreamBatcher(ds, 2, 64, eod, seed=5, dp_rank=1, dp_size=2)
    it = iter(xl)
    for _ in range(9):
        next(it)
    state = xl.state_dict()
    expected = [next(it) for _ in range(3)]

    resumed = XLStreamBatcher(ds, 2, 64, eod, seed=5, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    for want, got in zip(expected, iter(resumed)):
        assert torch.equal(want["input_ids"], got["input_ids"])

    # Same global batch split differently: rank 0 of dp=1 holds global rows 0..3.
    regrouped = XLStreamBatcher(ds, 4, 64, eod, seed=5)
    regrouped.load_state_dict(state)
    assert torch.equal(next(iter(regrouped))["input_ids"][2:], expected[0]["input_ids"])

    with pytest.raises(ValueError, match="global_rows"):
        XLStreamBatcher(ds, 3, 64, eod, seed=5).load_state_dict(state)
