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


def test_accumulation_slots_split_the_global_batch_and_continue_per_slot(sample_data):
    """G = micro x DP x accumulation streams: slot m of DP rank r holds global rows
    (m * dp + r) * micro + b, and slot m of step t+1 continues slot m of step t."""
    ds, eod = sample_data.char_ds, sample_data.char_tokenizer.eod_id
    whole = XLStreamBatcher(ds, 8, 32, eod, seed=3)  # 8 streams, one slot
    ranks = [XLStreamBatcher(ds, 2, 32, eod, seed=3, dp_rank=r, dp_size=2, accumulation=2)
             for r in range(2)]
    assert [ranks[1].rows(m) for m in range(2)] == [[2, 3], [6, 7]]
    assert ranks[0].global_rows == 8 and ranks[0].slots == 2
    for t in (0, 1, 40):
        got = torch.empty(8, 32, dtype=torch.long)
        for r in ranks:
            for m in range(2):
                got[r.rows(m)] = r.batch(t, m)["input_ids"]
        assert torch.equal(got, whole.batch(t)["input_ids"])
    # Iteration hands out the slots of a step, then the next step.
    it = iter(ranks[0])
    order = [(ranks[0].step, ranks[0].slot) for _ in range(5) if next(it) is not None]
    assert order == [(0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    with pytest.raises(IndexError, match="slot 2 is outside"):
        ranks[0].rows(2)


def test_document_start_marks_the_first_input_of_every_document(sample_data):
    ds, eod = sample_data.char_ds, sample_data.char_tokenizer.eod_id
    xl = XLStreamBatcher(ds, 3, 64, eod, seed=7)
    stream = stream_of(ds, xl, 0, eod)
    row_len = len(stream) // 3
    for t in (0, 1, 2, 30):
        x = xl.batch(t)
        for row in range(3):
            begin = row * row_len + t * 64
            before = stream[begin - 1:begin + 63] if begin else np.r_[eod, stream[:63]]
            # Row starts of the epoch begin afresh (no text before them in the stream).
            want = torch.from_numpy(before == eod)
            if t == 0:
                want[0] = True
            assert torch.equal(x["document_start"][row], want), (t, row)
    assert xl.batch(0)["document_start"][:, 0].all()
    # Documents end inside segments too.
    assert any(xl.batch(t)["document_start"][:, 1:].any() for t in range(1, 40))


def test_position_is_saved_between_and_within_steps_at_any_split(sample_data):
    ds, eod = sample_data.char_ds, sample_data.char_tokenizer.eod_id
    xl = XLStreamBatcher(ds, 2, 32, eod, seed=4, accumulation=2)  # 4 streams
    it = iter(xl)
    for _ in range(7):  # 3 steps and one slot of the 4th
        next(it)
    state = xl.state_dict()
    assert (state["step"], state["slot"], state["global_rows"]) == (3, 1, 4)
    want = next(it)
    resumed = XLStreamBatcher(ds, 2, 32, eod, seed=4, accumulation=2)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"], want["input_ids"])
    # Between steps, the same 4 streams split over 2 DP ranks of one slot each.
    between = xl.state_dict()
    dp = XLStreamBatcher(ds, 2, 32, eod, seed=4, dp_rank=1, dp_size=2)
    dp.load_state_dict(between)
    assert torch.equal(next(iter(dp))["input_ids"], xl.batch(4, 1)["input_ids"])
    # Within a step, a split with fewer slots cannot continue.
    with pytest.raises(ValueError, match="saved at slot 1 of a step"):
        XLStreamBatcher(ds, 4, 32, eod, seed=4).load_state_dict(state)


def test_another_number_of_streams_resumes_as_far_into_the_epoch_only_when_asked(sample_data):
    ds, eod = sample_data.char_ds, sample_data.char_tokenizer.eod_id
    four = XLStreamBatcher(ds, 4, 32, eod, seed=4)
    four.load_state_dict({"step": len(four) + 100, "slot": 0, "global_rows": 4,
                          "seq_length": 32, "seed": 4})
    state = four.state_dict()
    eight = XLStreamBatcher(ds, 8, 32, eod, seed=4)
    with pytest.raises(ValueError, match="global_rows=4 but this run has global_rows=8"):
        eight.load_state_dict(state)
    eight.load_state_dict(state, regroup=True)
    # Epoch 1, 100 steps of rows twice as long: 50 steps into rows half as long.
    assert eight.step == len(eight) + 100 * eight.row_length // four.row_length == len(eight) + 50
    assert eight.state_dict()["global_rows"] == 8
    mid = dict(state, slot=1)
    with pytest.raises(ValueError, match="only a state saved between steps"):
        XLStreamBatcher(ds, 8, 32, eod, seed=4).load_state_dict(mid, regroup=True)
