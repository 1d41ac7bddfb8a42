import os
import pickle

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import (DatasetError, IndexedDataset,
                                                IndexedDatasetBuilder, dataset_paths,
                                                merge_datasets, split_by_document,
                                                write_document_files)


def random_docs(rng, n, vocab_size, max_len=50):
    return [rng.integers(0, vocab_size, size=rng.integers(1, max_len)) for _ in range(n)]


def build(prefix, docs, vocab_size, tokenizer_hash="h0", word_starts=None):
    with IndexedDatasetBuilder(str(prefix), vocab_size, tokenizer_hash,
                               with_word_starts=word_starts is not None) as b:
        for i, d in enumerate(docs):
            b.add_document(d, None if word_starts is None else word_starts[i])
    return IndexedDataset(str(prefix))


def leftovers(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("vocab_size,dtype", [(50000, np.uint16), (65536, np.uint16),
                                              (65537, np.uint32), (250000, np.uint32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 40, vocab_size)
    docs[0][0] = vocab_size - 1  # the largest id must survive the narrowest dtype
    ds = build(tmp_path / "d", docs, vocab_size)
    assert ds.dtype == dtype and ds.vocab_size == vocab_size and ds.tokenizer_hash == "h0"
    assert len(ds) == 40 and ds.num_tokens == sum(len(d) for d in docs)
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.doc_offsets.tolist() == np.concatenate([[0], np.cumsum(ds.sizes)]).tolist()
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d.tolist()
    assert ds[-1].tolist() == docs[-1].tolist()
    assert not ds.has_word_starts
    assert os.path.getsize(tmp_path / "d.bin") == ds.num_tokens * np.dtype(dtype).itemsize


def test_get_slices_and_views(tmp_path):
    docs = [np.arange(10), np.arange(100, 105)]
    ds = build(tmp_path / "d", docs, 1000)
    assert ds.get(0, offset=3, length=4).tolist() == [3, 4, 5, 6]
    assert ds.get(1, offset=2).tolist() == [102, 103, 104]
    assert ds.get(1, offset=5).tolist() == []
    # Views into the memory map, not copies of the file.
    assert isinstance(ds[0], np.memmap) and not ds[0].flags.owndata
    with pytest.raises(IndexError, match="out of range for document 1"):
        ds.get(1, offset=3, length=3)
    with pytest.raises(IndexError, match="document 2 out of range"):
        ds[2]


def test_word_starts_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 20, 300)
    ws = [rng.random(len(d)) < 0.5 for d in docs]
    ds = build(tmp_path / "w", docs, 300, word_starts=ws)
    assert ds.has_word_starts
    for i in range(len(docs)):
        assert ds.word_starts(i).dtype == np.bool_
        assert ds.word_starts(i).tolist() == ws[i].tolist()
    plain = build(tmp_path / "p", docs, 300)
    with pytest.raises(DatasetError, match="p has no word boundaries.*--word-boundaries"):
        plain.word_starts(0)


def test_pickle_reopens_instead_of_copying(tmp_path):
    docs = [np.arange(5000) % 300]
    ds = build(tmp_path / "d", docs, 300)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    assert pickle.loads(blob)[0].tolist() == docs[0].tolist()


def test_builder_rejects_bad_documents(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "d"), 100, "h", with_word_starts=True) as b:
        with pytest.raises(ValueError, match="token id 100 is outside the vocabulary"):
            b.add_document([1, 100], [1, 0])
        with pytest.raises(ValueError, match="token id -1"):
            b.add_document([-1, 2], [1, 0])
        with pytest.raises(ValueError, match="non-empty 1-D"):
            b.add_document([], [])
        with pytest.raises(ValueError, match="1 word-start flags for 2 tokens"):
            b.add_document([1, 2], [1])
        with pytest.raises(ValueError, match="needs them"):
            b.add_document([1, 2])
        with pytest.raises(ValueError, match="must be integers"):
            b.add_document([1.5], [1])
        b.add_document([1, 2], [1, 0])
    assert IndexedDataset(str(tmp_path / "d"))[0].tolist() == [1, 2]


@pytest.mark.parametrize("kernel_copy", [True, False])
@pytest.mark.parametrize("vocab_size", [1000, 70000])
def test_document_files_append_what_add_documents_writes(tmp_path, monkeypatch, kernel_copy,
                                                         vocab_size):
    # A preprocessing worker writes chunks to reused files; the main process appends them.
    rng = np.random.default_rng(0)
    chunks = [random_docs(rng, n, vocab_size) for n in (5, 1, 9, 3)]
    if not kernel_copy:  # e.g. another file system: the bytes pass through this process
        def no_copy(*args):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", no_copy)
    with IndexedDatasetBuilder(str(tmp_path / "ref"), vocab_size, "h", True) as ref, \
            IndexedDatasetBuilder(str(tmp_path / "files"), vocab_size, "h", True) as out:
        for k, docs in enumerate(chunks):
            tokens, sizes = np.concatenate(docs), np.array([d.size for d in docs])
            starts = rng.integers(0, 2, tokens.size).astype(bool)
            ref.add_documents(tokens, sizes, starts)
            if k == 2:  # some documents the usual way in between
                out.add_documents(tokens, sizes, starts)
                continue
            # The same two files every time: later chunks overwrite a longer earlier one.
            paths = write_document_files(str(tmp_path / "slot"), tokens, sizes, starts,
                                         vocab_size, True)
            out.add_document_files(sizes, *paths)
    a, b = dataset_paths(tmp_path / "ref"), dataset_paths(tmp_path / "files")
    for ext in ("bin", "idx", "ws"):
        assert open(a[ext], "rb").read() == open(b[ext], "rb").read(), ext
    assert len(IndexedDataset(str(tmp_path / "files"))) == 18


def test_document_files_are_checked(tmp_path):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_document_files(str(tmp_path / "s"), np.array([1, 100]), [2], None, 100, False)
    paths = write_document_files(str(tmp_path / "s"), np.array([1, 2, 3]), [3], None, 100, False)
    with IndexedDatasetBuilder(str(tmp_path / "d"), 100, "h") as b:
        with pytest.raises(ValueError, match="holds 6 bytes, expected 8"):
            b.add_document_files([4], *paths)
        with pytest.raises(ValueError, match="sizes must be positive"):
            b.add_document_files([3, 0], *paths)
        with pytest.raises(ValueError, match="word-start file given"):
            b.add_document_files([3], paths[0], paths[0])
        b.add_document_files([1, 2], *paths)
    assert [IndexedDataset(str(tmp_path / "d"))[i].tolist() for i in range(2)] == [[1], [2, 3]]


def test_failure_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(str(tmp_path / "d"), 100, "h", with_word_starts=True) as b:
            b.add_document([1, 2, 3], [1, 0, 1])
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="no documents were added"):
        with IndexedDatasetBuilder(str(tmp_path / "e"), 100, "h"):
            pass
    assert leftovers(tmp_path) == []


def test_failed_rebuild_keeps_the_old_dataset(tmp_path):
    build(tmp_path / "d", [np.array([7, 8])], 100)
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "d"), 100, "h") as b:
            b.add_document([1])
            raise RuntimeError("interrupted")
    assert IndexedDataset(str(tmp_path / "d"))[0].tolist() == [7, 8]
    assert leftovers(tmp_path) == ["d.bin", "d.idx"]


def test_corrupt_or_missing_files_name_the_path(tmp_path):
    build(tmp_path / "d", [np.arange(10)], 100, word_starts=[np.ones(10, bool)])
    with pytest.raises(DatasetError, match=r"nope.idx: no such index file.*preprocess_data"):
        IndexedDataset(str(tmp_path / "nope"))

    with open(tmp_path / "d.bin", "r+b") as f:
        f.truncate(7)
    with pytest.raises(DatasetError, match=r"d.bin: 7 bytes, expected 20.*rerun "
                                           r"tools/preprocess_data.py"):
        IndexedDataset(str(tmp_path / "d"))
    os.remove(tmp_path / "d.bin")
    with pytest.raises(DatasetError, match=r"d.bin: missing"):
        IndexedDataset(str(tmp_path / "d"))

    build(tmp_path / "d", [np.arange(10)], 100, word_starts=[np.ones(10, bool)])
    os.remove(tmp_path / "d.ws")
    with pytest.raises(DatasetError, match=r"d.ws: missing \(word starts"):
        IndexedDataset(str(tmp_path / "d"))

    idx = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(idx[:-8])
    with pytest.raises(DatasetError, match="d.idx: .* bytes, expected .*truncated"):
        IndexedDataset(str(tmp_path / "d"))
    (tmp_path / "d.idx").write_bytes(b"garbage" * 4)
    with pytest.raises(DatasetError, match="d.idx: not a megatron_lite index"):
        IndexedDataset(str(tmp_path / "d"))


def test_merge(tmp_path):
    rng = np.random.default_rng(2)
    a_docs, b_docs = random_docs(rng, 5, 70000), random_docs(rng, 7, 70000)
    a_ws = [rng.random(len(d)) < 0.5 for d in a_docs]
    b_ws = [rng.random(len(d)) < 0.5 for d in b_docs]
    build(tmp_path / "a", a_docs, 70000, word_starts=a_ws)
    build(tmp_path / "b", b_docs, 70000, word_starts=b_ws)
    m = merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert len(m) == 12 and m.dtype == np.uint32 and m.tokenizer_hash == "h0"
    for i, (d, w) in enumerate(zip(a_docs + b_docs, a_ws + b_ws)):
        assert m[i].tolist() == d.tolist() and m.word_starts(i).tolist() == w.tolist()


def test_merge_refuses_mismatches(tmp_path):
    build(tmp_path / "a", [np.arange(3)], 100, tokenizer_hash="h1")
    build(tmp_path / "b", [np.arange(3)], 100, tokenizer_hash="h2")
    build(tmp_path / "c", [np.arange(3)], 100, tokenizer_hash="h1",
          word_starts=[np.ones(3, bool)])
    with pytest.raises(DatasetError, match="b \\(tokenizer h2\\) with .*a \\(tokenizer h1\\)"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    with pytest.raises(DatasetError, match="only one has word boundaries"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "m"))
    assert not any(name.startswith("m.") for name in leftovers(tmp_path))


def test_split_by_document(tmp_path):
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 200, 1000)
    ws = [rng.random(len(d)) < 0.5 for d in docs]
    build(tmp_path / "all", docs, 1000, word_starts=ws)
    outs = {str(tmp_path / "train"): 0.8, str(tmp_path / "valid"): 0.15,
            str(tmp_path / "test"): 0.05}
    parts = split_by_document(str(tmp_path / "all"), outs, seed=7)
    assert [len(parts[p]) for p in outs] == [160, 30, 10]
    seen = sorted((tuple(ds[i].tolist()), tuple(ds.word_starts(i).tolist()))
                  for ds in parts.values() for i in range(len(ds)))
    assert seen == sorted((tuple(d.tolist()), tuple(w.tolist())) for d, w in zip(docs, ws))
    again = split_by_document(str(tmp_path / "all"), {str(tmp_path / "t2"): 0.8,
                                                      str(tmp_path / "v2"): 0.2}, seed=7)
    assert [again[str(tmp_path / "t2")][i].tolist() for i in range(3)] == \
        [parts[str(tmp_path / "train")][i].tolist() for i in range(3)]


def test_split_errors(tmp_path):
    build(tmp_path / "all", [np.arange(3)] * 10, 100)
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_document(str(tmp_path / "all"), {str(tmp_path / "a"): 0.5,
                                                  str(tmp_path / "b"): 0.4})
    with pytest.raises(ValueError, match="gets none of the 10 documents"):
        split_by_document(str(tmp_path / "all"), {str(tmp_path / "a"): 0.99,
                                                  str(tmp_path / "b"): 0.01})
    assert leftovers(tmp_path) == ["all.bin", "all.idx"]
