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

This is `pretrain.py` with `--model t5` as the default; the model and its data builder live in
megatron_lite/models/t5.py.
"""

from megatron_lite.parallel.launch import exit_process
from megatron_lite.training.trainer import pretrain, run_main


def main(argv=None):
    return pretrain(argv, default_model="t5")


if __name__ == "__main__":
    exit_process(run_main(main))
