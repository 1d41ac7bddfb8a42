"""`--compile` (training.compile): the tiny GPT's loss through torch.compile trains as the eager
model does, up to the float reordering of inductor's fused kernels. The speed is a benchmark's
(BENCHMARKS.md, "Training throughput (GPT, torch.compile)"); compiling costs tens of seconds, so
this is the one test that turns it on."""
import os

import torch

from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(rank, world, argv):
    from torch._dynamo.utils import counters

    from pretrain_gpt import main
    losses = main(argv)["loss"]
    return losses, counters["stats"]["unique_graphs"]  # graphs dynamo compiled in this rank


def test_compiled_loss_trains_as_the_eager_one(gpt_data, tmp_path):
    argv = ["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
            "--tokenizer", str(gpt_data / "tokenizer"),
            "--train-data-prefix", str(gpt_data / "train"), "--seq-length", "64",
            "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "4",
            "--lr", "3e-3", "--lr-warmup-iters", "1", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--peak-flops", "1e12", "--no-progress-bar",
            "--log-interval", "1", "--eval-interval", "100", "--seed", "7"]
    eager, eager_graphs = run_distributed(_train, 1,
                                          argv + ["--save", str(tmp_path / "eager")])[0]
    compiled, graphs = run_distributed(_train, 1, argv + ["--save", str(tmp_path / "compiled"),
                                                          "--compile"])[0]
    assert eager_graphs == 0 and graphs > 0
    assert len(eager) == len(compiled) == 4
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=0)
