"""Pretrain (or fine-tune) any registered model: `--model NAME` picks it.

    python pretrain.py --model gpt --config configs/gpt/tiny.yaml --save runs/tiny
    deepspeed --num_gpus 2 pretrain.py --model t5 --config configs/t5/tiny.yaml ... \
        --tensor-model-parallel-size 2 --deepspeed --deepspeed_config configs/deepspeed/zero1.json
A model defined in your own module (README, "Adding an architecture"):
    python pretrain.py --model-module my_models.py --model my_encoder --config my.yaml ...

The model's registry record (megatron_lite/models/<name>.py) says everything else: its config
and data sections, its objective, how its loss and FLOPs are counted. `pretrain_gpt.py` and
`pretrain_t5.py` are this script with a default model.
"""

from megatron_lite.parallel.launch import exit_process
from megatron_lite.training.trainer import pretrain, run_main


def main(argv=None):
    return pretrain(argv)


if __name__ == "__main__":
    exit_process(run_main(main))
