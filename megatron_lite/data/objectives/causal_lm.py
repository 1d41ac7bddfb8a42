"""Causal LM packing (GPT / LingLong / LongNet), Megatron style.

The token stream of an epoch is every document, in an order shuffled per epoch with the seed, each
followed by the end-of-document token. Sample i covers stream tokens [i*S, i*S + S + 1): inputs are
the first S, labels the last S, so consecutive samples share one token (as in Megatron) and a long
document simply continues into the next sample. The stream is never materialised: the cumulative
start of each document in the shuffled order is the whole index (Megatron's doc_idx + sample_idx),
and a sample is gathered from the memory-mapped documents it overlaps.

Options, with Megatron's names:
- reset_position_ids: positions restart at 0 after every eod inside a sample;
- reset_attention_mask: adds `attention_mask` [1, S, S] (bool, True = may attend): causal and
  within the same document (an eod belongs to the document it ends);
- eod_mask_loss: loss_mask is 0 where the label is the eod token;
- backward: each document's tokens are reversed before packing (LingLong-Backward); the eod still
  follows each (reversed) document;
- append_eod: the objective adds the eods (default); False for a dataset preprocessed with
  --append-eod, whose documents already end with one.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from megatron_lite.data.objectives import dataset_name, shuffle_rng, split_index, to_tensors


def ends_with_eod(ds, eod_id: int, probe: int = 64) -> bool:
    """Whether the dataset looks built with --append-eod: every probed document ends in eod."""
    sizes = np.asarray(ds.sizes)
    docs = np.flatnonzero(sizes > 0)
    if len(docs) == 0:
        return False
    docs = docs[np.linspace(0, len(docs) - 1, min(probe, len(docs))).astype(np.int64)]
    return all(int(ds.get(int(d), int(sizes[d]) - 1, 1)[0]) == eod_id for d in docs)


class TokenStream:
    """An epoch's documents, shuffled with (seed, epoch), concatenated with eod after each.

    The objective adds the eods: datasets hold bare documents. One preprocessed with
    --append-eod already ends every document with eod; pass append_eod=False for it (a dataset
    that looks like one while append_eod is on is an error, since it would double every eod).
    """

    def __init__(self, ds, eod_id: int, seed: int, *, backward: bool = False,
                 append_eod: bool = True):
        self.ds = ds
        self.eod_id = int(eod_id)
        self.seed = int(seed)
        self.backward = backward
        self.sizes = np.asarray(ds.sizes, dtype=np.int64)
        if len(self.sizes) == 0:
            raise ValueError(f"dataset {dataset_name(ds)} has no documents; rerun "
                             "tools/preprocess_data.py on a non-empty corpus")
        if append_eod and ends_with_eod(ds, self.eod_id):
            raise ValueError(f"dataset {dataset_name(ds)} already ends its documents with the eod "
                             f"token {self.eod_id} (built with --append-eod?); pass "
                             "append_eod=False, or rebuild it without --append-eod")
        if not append_eod:
            # The stored eod is not read: the stream's own separator stands in for it (so a
            # backward stream reverses the text only, not the eod).
            self.sizes = self.sizes - 1
            if (self.sizes < 0).any():
                raise ValueError(f"dataset {dataset_name(ds)} has an empty document, so it was not"
                                 " built with --append-eod; use append_eod=True")
        self.tokens_per_epoch = int(self.sizes.sum()) + len(self.sizes)
        self._cached_epoch = None

    def document_order(self, epoch: int) -> np.ndarray:
        """Document indices in the order they appear in the stream of `epoch`."""
        return shuffle_rng(self.seed, epoch, "document_order").permutation(len(self.sizes))

    def _index(self, epoch: int):
        # One epoch's index is cached: a sampler walks an epoch before moving to the next.
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            order = self.document_order(epoch)
            starts = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.sizes[order] + 1, out=starts[1:])
            self._cached_epoch = (epoch, order, starts)
        return self._cached_epoch[1], self._cached_epoch[2]

    def _walk(self, epoch: int, start: int, length: int):
        """(filled, doc, offset, take) runs of documents covering stream slice [start, start +
        length), doc None for a separator (take 1)."""
        if start < 0 or start + length > self.tokens_per_epoch:
            raise IndexError(f"stream slice [{start}, {start + length}) is outside the epoch's "
                             f"{self.tokens_per_epoch} tokens")
        order, starts = self._index(epoch)
        k = int(np.searchsorted(starts, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            doc = int(order[k])
            n = int(self.sizes[doc])
            off = pos - int(starts[k])
            if off < n:
                take = min(n - off, length - filled)
                yield filled, doc, off, take
            else:
                take = 1
                yield filled, None, 0, 1
                k += 1
            filled += take
            pos += take

    def tokens(self, epoch: int, start: int, length: int) -> np.ndarray:
        """Stream tokens [start, start + length) of `epoch` as int64."""
        out = np.empty(length, dtype=np.int64)
        for filled, doc, off, take in self._walk(epoch, start, length):
            if doc is None:
                out[filled] = self.eod_id
            elif self.backward:
                # Offset `off` of the reversed document is offset n-1-off of the original.
                n = int(self.sizes[doc])
                out[filled:filled + take] = np.asarray(self.ds.get(doc, n - off - take, take))[::-1]
            else:
                out[filled:filled + take] = self.ds.get(doc, off, take)
        return out

    def word_starts(self, epoch: int, start: int, length: int) -> np.ndarray:
        """Whether each token of stream slice [start, start + length) starts a word (the stored
        jieba boundaries; a separator is a word of its own, and a document starts one)."""
        if self.backward:
            raise ValueError("word boundaries of a backward (reversed) stream are not defined")
        out = np.empty(length, dtype=bool)
        for filled, doc, off, take in self._walk(epoch, start, length):
            if doc is None:
                out[filled] = True
            else:
                out[filled:filled + take] = self.ds.word_starts(doc)[off:off + take]
                out[filled] |= off == 0
        return out


def reset_positions(input_ids: np.ndarray, eod_id: int) -> np.ndarray:
    """Position of each token counted from the start of its document (or of the sample)."""
    n = len(input_ids)
    idx = np.arange(n, dtype=np.int64)
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    starts[1:] = input_ids[:-1] == eod_id
    return idx - np.maximum.accumulate(np.where(starts, idx, 0))


def document_attention_mask(input_ids: np.ndarray, eod_id: int) -> np.ndarray:
    """[1, S, S] bool: causal and within one document; the eod closes its own document."""
    seg = np.zeros(len(input_ids), dtype=np.int64)
    seg[1:] = np.cumsum(input_ids[:-1] == eod_id)
    same_doc = seg[:, None] == seg[None, :]
    causal = np.tri(len(input_ids), dtype=bool)
    return (same_doc & causal)[None]


def causal_lm_sample(x: np.ndarray, eod_id: int, *, reset_position_ids: bool,
                     reset_attention_mask: bool, eod_mask_loss: bool) -> dict:
    """S+1 stream tokens -> the causal LM keys of the batch contract (numpy)."""
    input_ids, labels = x[:-1], x[1:]
    loss_mask = np.ones(len(labels), dtype=np.float32)
    if eod_mask_loss:
        loss_mask[labels == eod_id] = 0.0
    if reset_position_ids:
        position_ids = reset_positions(input_ids, eod_id)
    else:
        position_ids = np.arange(len(input_ids), dtype=np.int64)
    sample = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
              "position_ids": position_ids}
    if reset_attention_mask:
        sample["attention_mask"] = document_attention_mask(input_ids, eod_id)
    return sample


class CausalLMDataset(Dataset):
    """Packed causal LM samples of `seq_length` tokens; `len()` = samples per epoch."""

    def __init__(self, ds, seq_length: int, eod_id: int, seed: int, *,
                 reset_position_ids: bool = False, reset_attention_mask: bool = False,
                 eod_mask_loss: bool = False, backward: bool = False,
                 append_eod: bool = True, return_source: bool = False):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.seq_length = int(seq_length)
        self.eod_id = int(eod_id)
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask
        self.eod_mask_loss = eod_mask_loss
        self.return_source = return_source
        self.stream = TokenStream(ds, eod_id, seed, backward=backward, append_eod=append_eod)
        # The last sample needs one token beyond its inputs (its last label).
        self.num_samples = (self.stream.tokens_per_epoch - 1) // self.seq_length
        if self.num_samples == 0:
            raise ValueError(f"dataset {dataset_name(ds)} holds {self.stream.tokens_per_epoch} "
                             f"tokens (eod included), fewer than one sample of seq_length + 1 = "
                             f"{self.seq_length + 1}; lower --seq-length or add data")

    def __len__(self) -> int:
        return self.num_samples

    def document_order(self, epoch: int) -> np.ndarray:
        return self.stream.document_order(epoch)

    def __getitem__(self, idx: int) -> dict:
        epoch, i = split_index(idx, self.num_samples)
        x = self.stream.tokens(epoch, i * self.seq_length, self.seq_length + 1)
        sample = causal_lm_sample(x, self.eod_id, reset_position_ids=self.reset_position_ids,
                                  reset_attention_mask=self.reset_attention_mask,
                                  eod_mask_loss=self.eod_mask_loss)
        if self.return_source:
            sample["source_ids"] = x
        return to_tensors(sample)
