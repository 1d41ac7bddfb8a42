"""T5 through change_mp's resharding (megatron_lite.checkpoint.reshard), which knows no model: it
cuts by the partition tags recorded in the metadata. A trained tiny T5 resharded 1 -> 2, and an
imported one resharded 2 -> 1, give the original logits (and, trained, the same greedy outputs)."""
import os

import pytest
import torch

from megatron_lite.checkpoint.checkpointing import (read_model_states,
                                                    write_weights_only_checkpoint)
from megatron_lite.checkpoint.metadata import CheckpointMeta
from megatron_lite.checkpoint.reshard import shard_state_dict
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.inference.seq2seq import generate_seq2seq
from megatron_lite.models import get_model_spec
from megatron_lite.models.t5 import T5Config, T5Model
from megatron_lite.parallel import ParallelState, RNGContext, gather_full_logits
from megatron_lite.testing import run_distributed

reshard = pytest.importorskip("megatron_lite.checkpoint.reshard")


def _build(load_dir, ps):
    state, meta, _ = read_model_states(load_dir, ps.tp_rank)
    assert meta.tp_size == ps.tp_size
    model = T5Model(T5Config(**meta.model_config), ps, RNGContext(0, 0, ps.tp_rank))
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def evaluate(rank, world, dirs, enc, dec):
    """Full logits of every checkpoint in `dirs`, and greedy outputs for the sources in `enc`."""
    ps = ParallelState.single() if world == 1 else ParallelState.from_world(world)
    out = {}
    for d in dirs:
        model = _build(d, ps)
        sources = [row[row != 0].tolist() for row in enc]
        out[d] = (gather_full_logits(model(enc, dec), ps, model.cfg.vocab_size),
                  generate_seq2seq(model, sources, 16, greedy=True))
    return out


def test_resharded_t5_is_the_same_model(t5_checkpoint, tmp_path):
    trained1 = str(t5_checkpoint)
    trained2 = str(tmp_path / "trained_tp2")
    reshard.reshard_checkpoint(trained1, 2, trained2)
    # A second model with another layout (v1.1: gated, separate head), born at TP=2.
    _, meta, ckpt_dir = read_model_states(trained1, 0)
    cfg = T5Config(**{**meta.model_config, "feed_forward_proj": "gated-gelu",
                      "tie_word_embeddings": False})
    model = T5Model(cfg)
    tokenizer = load_tokenizer(os.path.join(ckpt_dir, "tokenizer"))
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gated2 = str(tmp_path / "gated_tp2")
    spec = get_model_spec("t5")
    write_weights_only_checkpoint(gated2, CheckpointMeta.for_model(spec, cfg, 2, tokenizer),
                                  shard_state_dict(full, spec, cfg, 2), tokenizer)
    gated1 = str(tmp_path / "gated_tp1")
    reshard.reshard_checkpoint(gated2, 1, gated1)

    g = torch.Generator().manual_seed(0)
    enc = torch.randint(110, 3000, (3, 40), generator=g)
    enc[:, 5] = tokenizer.sentinel_id(1)
    enc[2, 30:] = 0
    dec = torch.randint(110, 3000, (3, 20), generator=g)
    dec[:, 0] = 0
    one = evaluate(0, 1, [trained1, gated1], enc, dec)
    two = run_distributed(evaluate, 2, [trained2, gated2], enc, dec)[0]
    torch.testing.assert_close(two[trained2][0], one[trained1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(one[gated1][0], two[gated2][0], atol=1e-5, rtol=0)
    assert two[trained2][1] == one[trained1][1]  # greedy, trained: token for token
    assert read_model_states(gated1, 0)[1].tp_size == 1
