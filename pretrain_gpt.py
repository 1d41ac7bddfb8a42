"""Pretrain (or fine-tune) a GPT: LingLong-style, dense or with alternating sparse attention.

One process (TP=1):
    python pretrain_gpt.py --config configs/gpt/tiny.yaml --save runs/tiny
Two CPU ranks, tensor-parallel size 2, under the DeepSpeed launcher:
    deepspeed --num_gpus 2 pretrain_gpt.py --config configs/gpt/tiny.yaml \
        --tensor-model-parallel-size 2 --deepspeed --deepspeed_config configs/deepspeed/zero1.json
Several machines: add `--hostfile hostfiles/example` (see README, "Launching").
Resume: `--load runs/tiny`; fine-tune on prompt/text pairs: `--load CKPT --finetune
--finetune-data data/sample/finetune.jsonl`.
"""
from __future__ import annotations

import sys

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.objectives.causal_lm import CausalLMDataset
from megatron_lite.data.objectives.prompt_text import PromptTextDataset
from megatron_lite.data.tokenizer import check_tokenizer_hash
from megatron_lite.training.trainer import Datasets, pretrain, run_main
import megatron_lite.models.gpt  # noqa: F401  (registers "gpt")


def gpt_datasets(run, tokenizer, model_cfg, ps) -> Datasets:
    """Causal-LM datasets over the indexed train/valid prefixes, or prompt/text fine-tuning."""
    data, seed = run.data, run.training.seed
    if tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer in the config or pass --tokenizer DIR")
    if data.finetune_data:
        train = PromptTextDataset(data.finetune_data, tokenizer, data.seq_length,
                                  truncate=data.truncate, eod_id=tokenizer.eod_id)
        return Datasets(train=train, valid=None)

    def causal(prefix):
        indexed = IndexedDataset(prefix)
        check_tokenizer_hash(indexed.tokenizer_hash, tokenizer, prefix)
        return CausalLMDataset(indexed, data.seq_length, tokenizer.eod_id, seed,
                               reset_position_ids=data.reset_position_ids,
                               reset_attention_mask=data.reset_attention_mask,
                               eod_mask_loss=data.eod_mask_loss, backward=model_cfg.backward)

    if not data.train_data_prefix:
        raise ValueError("no training data: set data.train_data_prefix in the config or pass "
                         "--train-data-prefix PREFIX (made by tools/preprocess_data.py)")
    valid = causal(data.valid_data_prefix) if data.valid_data_prefix else None
    return Datasets(train=causal(data.train_data_prefix), valid=valid)


def main(argv=None):
    return pretrain(argv, model_name="gpt", datasets_provider=gpt_datasets)


if __name__ == "__main__":
    sys.exit(run_main(main))
