"""Pretrain (or fine-tune) a GPT: LingLong-style, dense or with alternating sparse attention.

One process (TP=1):
    python pretrain_gpt.py --config configs/gpt/tiny.yaml --save runs/tiny
Two CPU ranks, tensor-parallel size 2, under the DeepSpeed launcher:
    deepspeed --num_gpus 2 pretrain_gpt.py --config configs/gpt/tiny.yaml \
        --tensor-model-parallel-size 2 --deepspeed --deepspeed_config configs/deepspeed/zero1.json
Several machines: add `--hostfile hostfiles/example` (see README, "Launching").
Resume: `--load runs/tiny`; fine-tune on prompt/text pairs: `--load CKPT --finetune
--finetune-data data/sample/finetune.jsonl`.

This is `pretrain.py` with `--model gpt` as the default: `--model NAME` selects another model of
the GPT family (any registered model, in fact). The model lives in megatron_lite/models/gpt.py.
"""

from megatron_lite.parallel.launch import exit_process
from megatron_lite.training.trainer import pretrain, run_main


def main(argv=None):
    return pretrain(argv, default_model="gpt")


if __name__ == "__main__":
    exit_process(run_main(main))
