"""Pretrain T5 / LongLM: text infilling (span corruption) mixed with conditional continuation.

One process (TP=1), on a sentencepiece tokenizer with sentinels (tools/train_tokenizer.py):
    python pretrain_t5.py --config configs/t5/tiny.yaml --tokenizer data/sample/tok_sp \
        --train-data-prefix data/sample/sp_train --valid-data-prefix data/sample/sp_valid \
        --save runs/t5-tiny
Two CPU ranks, tensor-parallel size 2, under the DeepSpeed launcher:
    deepspeed --num_gpus 2 pretrain_t5.py --config configs/t5/tiny.yaml ... \
        --tensor-model-parallel-size 2 --deepspeed --deepspeed_config configs/deepspeed/zero1.json
Resume: `--load runs/t5-tiny`. Start from a Hugging Face T5 / LongLM (tools/convert_hf.py import):
`--load CKPT --finetune`.

`data.seq_length` is the encoder (source) length and `data.decoder_seq_length` the decoder
(target) length; `data.span_corruption_weight` : `data.continuation_weight` is the mixture
(LongLM's 1:1 by default). Validation uses the same mixture over the validation prefix.
"""
from __future__ import annotations

import sys

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.objectives.continuation import ContinuationDataset, MixedT5Dataset
from megatron_lite.data.objectives.span_corruption import SpanCorruptionDataset
from megatron_lite.data.tokenizer import check_tokenizer_hash
from megatron_lite.models.t5 import T5DataConfig
from megatron_lite.training.trainer import Datasets, pretrain, run_main

# Distinct seeds per objective: at the same index the two would otherwise draw the same numbers.
_SPAN_SEED_OFFSET, _CONTINUATION_SEED_OFFSET = 0, 1


def t5_objective_dataset(indexed, tokenizer, data: T5DataConfig, model_cfg, seed: int,
                         return_source: bool = False):
    """The span-corruption / continuation mixture over one indexed dataset."""
    common = dict(max_source_length=data.seq_length, max_target_length=data.decoder_seq_length,
                  decoder_start_token_id=model_cfg.decoder_start_id, return_source=return_source)
    parts, weights = [], []
    if data.span_corruption_weight > 0:
        parts.append(SpanCorruptionDataset(
            indexed, tokenizer, seed + _SPAN_SEED_OFFSET, noise_density=data.noise_density,
            mean_span_length=data.mean_noise_span_length, first_sentinel=data.first_sentinel,
            **common))
        weights.append(data.span_corruption_weight)
    if data.continuation_weight > 0:
        parts.append(ContinuationDataset(indexed, tokenizer, seed + _CONTINUATION_SEED_OFFSET,
                                         sentinel=data.first_sentinel, **common))
        weights.append(data.continuation_weight)
    return parts[0] if len(parts) == 1 else MixedT5Dataset(parts, weights, seed=seed)


def t5_datasets(run, tokenizer, model_cfg, ps) -> Datasets:
    data, seed = run.data, run.training.seed
    if tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer in the config or pass --tokenizer DIR "
                         "(a sentencepiece or character tokenizer with sentinels)")
    if tokenizer.pad_id != model_cfg.pad_token_id:
        raise ValueError(f"the tokenizer's pad id is {tokenizer.pad_id} but model.pad_token_id is "
                         f"{model_cfg.pad_token_id}: set --pad-token-id {tokenizer.pad_id} (the "
                         "encoder masks positions holding the pad id)")
    if data.finetune_data:
        raise ValueError("data.finetune_data (prompt/text fine-tuning) is a GPT feature; T5 "
                         "fine-tunes with --load CKPT --finetune on its pretraining objectives")
    if not data.train_data_prefix:
        raise ValueError("no training data: set data.train_data_prefix in the config or pass "
                         "--train-data-prefix PREFIX (made by tools/preprocess_data.py)")

    def mixed(prefix):
        indexed = IndexedDataset(prefix)
        check_tokenizer_hash(indexed.tokenizer_hash, tokenizer, prefix)
        return t5_objective_dataset(indexed, tokenizer, data, model_cfg, seed)

    valid = mixed(data.valid_data_prefix) if data.valid_data_prefix else None
    return Datasets(train=mixed(data.train_data_prefix), valid=valid)


def main(argv=None):
    return pretrain(argv, model_name="t5", datasets_provider=t5_datasets,
                    data_config_cls=T5DataConfig)


if __name__ == "__main__":
    sys.exit(run_main(main))
