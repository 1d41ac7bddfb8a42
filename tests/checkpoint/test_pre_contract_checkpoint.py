"""Checkpoints written before the model contract still work, and a checkpoint from a newer
version is refused with a message rather than misread.

The fixture (tests/fixtures/pre_contract_gpt, see its README) was written by the trainer of
commit 9f46323 at TP=2 with the unversioned metadata of that time; `expected.json` holds what
that commit computed from it. Here the current code reshards it, generates from it and resumes
training from it, and must give the same numbers."""
import json
import os
import shutil

import pytest
import torch

from megatron_lite.checkpoint.checkpointing import META_KEY, model_state_path, read_metadata
from megatron_lite.checkpoint.metadata import METADATA_VERSION
from megatron_lite.parallel import ParallelState
from megatron_lite.testing import run_distributed, run_entry_point

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pre_contract_gpt")
# The flags the fixture was trained with (4 steps at TP=2), continued to step 6 at TP=1.
RESUME = ["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"), "--num-layers", "2",
          "--hidden-size", "16", "--num-attention-heads", "2", "--ffn-hidden-size", "32",
          "--max-position-embeddings", "32", "--seq-length", "16", "--sparse-stride", "8",
          "--sparse-summary", "2", "--micro-batch-size", "2", "--global-batch-size", "2",
          "--train-iters", "6", "--lr", "1e-2", "--lr-warmup-iters", "2", "--seed", "7",
          "--no-progress-bar", "--peak-flops", "1e12", "--eval-interval", "none"]


def _same(got, want, capability):
    if capability == torch.backends.cpu.get_cpu_capability():
        assert got == want  # bit for bit on the recording machine's ISA
    else:
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    import change_mp
    root = tmp_path_factory.mktemp("pre_contract")
    ckpt = root / "ckpt"
    shutil.copytree(os.path.join(FIXTURE, "ckpt"), ckpt)
    change_mp.main([str(ckpt), "1", "--keep-optimizer", "--quiet"])
    return root


def test_old_metadata_reads_as_the_current_schema():
    meta = read_metadata(os.path.join(FIXTURE, "ckpt"))
    assert meta.version == METADATA_VERSION and meta.model == "gpt" and meta.tp_size == 2
    assert meta.model_module is None and meta.sp_size == 1 and meta.stream_state is None


def test_resharded_old_checkpoint_gives_the_old_logits(resharded):
    from generate import load_model
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)
    model, tokenizer, spec = load_model(str(resharded / "ckpt_MP1"), ParallelState.single())
    assert spec.name == "gpt"
    model.block_sparse = False  # the recording's kernel (the block-sparse one: its own tests)
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(expected["prompt"])]))[0]
    _same(logits.tolist(), expected["logits"], expected["cpu_capability"])


def _train_with_masked_sparse_layers(rank, world_size, module, argv):
    """The recording's sparse kernel (masked SDPA): the block-sparse one draws its attention
    dropout over other shapes, so the same seed gives other masks (its equality with the masked
    one is in tests/models/test_gpt_sparse_attention.py). The loss too is the recording's: logits,
    then the cross entropy (the fused head: tests/parallel/test_linear_cross_entropy.py)."""
    from megatron_lite.models.gpt import GPTModel
    GPTModel.block_sparse = False
    GPTModel.fused_head_loss = False
    return run_entry_point(rank, world_size, module, argv)


def test_training_resumes_from_the_old_checkpoint_as_it_did(resharded):
    import tools.preprocess_data as preprocess
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)
    tokenizer = str(resharded / "ckpt_MP1" / "global_step4" / "tokenizer")
    prefix = str(resharded / "train")
    preprocess.main(["--input", os.path.join(FIXTURE, "train.jsonl"), "--output-prefix", prefix,
                     "--tokenizer", tokenizer, "--workers", "1", "--quiet"])
    argv = RESUME + ["--tokenizer", tokenizer, "--train-data-prefix", prefix,
                     "--load", str(resharded / "ckpt_MP1"), "--save", str(resharded / "resumed")]
    out = run_distributed(_train_with_masked_sparse_layers, 1, "pretrain_gpt", argv)[0]
    assert out["step"] == 6
    _same(out["loss"], expected["resumed_losses"], expected["cpu_capability"])


def test_a_newer_checkpoint_is_refused_by_every_tool(tmp_path, capsys):
    import change_mp
    import generate
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURE, "ckpt"), ckpt)
    for r in range(2):
        path = model_state_path(str(ckpt / "global_step4"), r)
        state = torch.load(path, weights_only=True)
        state[META_KEY]["version"] = METADATA_VERSION + 1
        torch.save(state, path)
    newer = f"newer megatron_lite (checkpoint metadata version {METADATA_VERSION + 1}"
    with pytest.raises(ValueError, match=r"newer megatron_lite"):
        read_metadata(str(ckpt))
    with pytest.raises(SystemExit):
        change_mp.main([str(ckpt), "1", "--out", str(tmp_path / "out"), "--quiet"])
    assert newer in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=newer.replace("(", r"\(")):
        generate.read_model(str(ckpt), ParallelState.virtual(2, 0))
