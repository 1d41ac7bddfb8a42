"""Pretrain Longformer (Longformer_ZH): masked LM over jieba whole-word masking, with banded
sliding-window attention and global attention on [CLS].

One process (TP=1), on a BERT-preset character tokenizer and a dataset preprocessed with word
boundaries:
    python tools/train_tokenizer.py --input data/sample/train.jsonl --output-dir data/sample/tok_bert \
        --type char --preset bert
    python tools/preprocess_data.py --input data/sample/train.jsonl --output-prefix data/sample/bert_train \
        --tokenizer data/sample/tok_bert --word-boundaries
    python pretrain_longformer.py --config configs/longformer/tiny.yaml --tokenizer data/sample/tok_bert \
        --train-data-prefix data/sample/bert_train --valid-data-prefix data/sample/bert_valid \
        --save runs/longformer-tiny
Two CPU ranks, tensor-parallel size 2, under the DeepSpeed launcher:
    deepspeed --num_gpus 2 pretrain_longformer.py --config configs/longformer/tiny.yaml ... \
        --tensor-model-parallel-size 2 --deepspeed --deepspeed_config configs/deepspeed/zero1.json

`data.seq_length` is the block length, [CLS] and [SEP] included (Longformer_ZH: 4096); documents
are packed into full blocks (`--no-pack-documents` pads one block per document window), [CLS] is
global (`--no-global-attention-cls`), and the prediction cap scales with the block
(`--max-predictions-per-seq N` fixes one). Validation reports the MLM loss and bits per character.

This is `pretrain.py` with `--model longformer` as the default; the model, its data builder and
its attention live in megatron_lite/models/longformer.py.
"""

from megatron_lite.parallel.launch import exit_process
from megatron_lite.training.trainer import pretrain, run_main


def main(argv=None):
    return pretrain(argv, default_model="longformer")


if __name__ == "__main__":
    exit_process(run_main(main))
