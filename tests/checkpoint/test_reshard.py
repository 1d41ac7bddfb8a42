"""change_mp.py on synthetic checkpoints: exact resharding, round trips, metadata, bad input.

Checkpoints are written here in the trainer's layout (DeepSpeed's file names, our metadata) from
models built rank by rank on virtual TP states. The initialisation is TP-invariant, so the same
seed at TP=1 and TP=2 is the same model: resharding one must give the other bit for bit.
"""
import contextlib
import dataclasses
import io
import os
import subprocess
import sys

import pytest
import torch

import change_mp
from megatron_lite.checkpoint.checkpointing import META_KEY, model_state_path
from megatron_lite.checkpoint.reshard import (ReshardError, reshard_checkpoint, reshard_tensor,
                                              resume_engine_config, universal_checkpoint_info)
from megatron_lite.models import GPTConfig, GPTModel
from megatron_lite.parallel import (ParallelState, RNGContext, initialize_parameters, is_sharded,
                                    merge_shards, take_shard)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAG = "global_step5"


def model_config(**overrides) -> GPTConfig:
    # A larger init std than training's spreads the logits (the parity tests compare argmaxes).
    kw = dict(vocab_size=200, num_layers=2, hidden_size=32, num_attention_heads=4,
              ffn_hidden_size=64, max_position_embeddings=64, hidden_dropout=0.0,
              attention_dropout=0.0, init_std=0.2, sparse_attention=False, sparse_stride=8,
              sparse_summary=2)
    kw.update(overrides)
    return GPTConfig(**kw)


def write_checkpoint(save_dir, tp: int, cfg: GPTConfig | None = None, *, seed: int = 7,
                     optimizer: bool = False) -> str:
    """A TP=`tp` checkpoint of the GPT `cfg` in the trainer's layout; returns `save_dir`.

    With `optimizer`, each model-state file holds a ZeRO stage 0 (torch AdamW) state whose
    moments are functions of the weights (exp_avg = w / 2, exp_avg_sq = w * w), so a test can
    check they were cut exactly like their parameters."""
    cfg = cfg or model_config()
    ckpt = os.path.join(save_dir, TAG)
    os.makedirs(ckpt)
    for r in range(tp):
        ps = ParallelState.virtual(tp, r)
        model = GPTModel(cfg, ps, RNGContext(0, 0, r))
        initialize_parameters(model, seed, ps)
        meta = dict(model="gpt", model_config=dataclasses.asdict(cfg), tokenizer_hash=None,
                    vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size,
                    tp_size=tp, dp_size=1, step=5, consumed_samples=40, seed=seed,
                    skipped_steps=0,
                    partition_spec={n: [p.partition_dim, p.partition_stride]
                                    for n, p in model.named_parameters() if is_sharded(p)})
        opt = None
        if optimizer:
            params = [p.detach() for p in model.parameters()]
            opt = {"state": {i: {"step": torch.tensor(5.0), "exp_avg": p / 2, "exp_avg_sq": p * p}
                             for i, p in enumerate(params)},
                   "param_groups": [{"lr": 1e-3, "params": list(range(len(params)))}]}
        torch.save({"module": model.state_dict(), "optimizer": opt, "mp_world_size": tp,
                    "dp_world_size": 1, "global_steps": 5, "lr_scheduler": {"last": 5},
                    "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": tp},
                    META_KEY: meta}, model_state_path(ckpt, r))
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(TAG)
    return str(save_dir)


def load_ranks(save_dir) -> list[dict]:
    with open(os.path.join(save_dir, "latest")) as f:
        tag = f.read().strip()
    ckpt = os.path.join(save_dir, tag)
    n = len([x for x in os.listdir(ckpt) if x.startswith("mp_rank_")])
    return [torch.load(model_state_path(ckpt, r), weights_only=True) for r in range(n)]


def run_change_mp(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            change_mp.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("dim,stride", [(0, 1), (1, 1), (0, 3), (1, 2)])
def test_reshard_tensor_equals_merge_then_take(dim, stride):
    shape = [24 * stride, 5] if dim == 0 else [3, 24 * stride]
    full = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for n in (1, 2, 4, 8):
        shards = [take_shard(full, dim, n, r, stride) for r in range(n)]
        assert torch.equal(merge_shards(shards, dim, stride), full)
        for m in (1, 2, 3, 4, 8):
            for t in range(m):
                got = reshard_tensor(shards, dim, stride, m, t)
                assert torch.equal(got, take_shard(full, dim, m, t, stride)), (n, m, t)
                # The result owns exactly its bytes: saving it never drags a source along.
                assert got.untyped_storage().nbytes() == got.numel() * got.element_size()


def test_tp1_to_tp2_is_the_model_saved_at_tp2(tmp_path):
    src = write_checkpoint(tmp_path / "tp1", 1)
    ref = load_ranks(write_checkpoint(tmp_path / "tp2", 2))
    code, out, _ = run_change_mp([src, 2])
    assert code == 0 and "TP=1 to TP=2" in out
    dst = tmp_path / "tp1_MP2"  # Chinese-Transformer-XL's default name
    assert (dst / "latest").read_text() == TAG
    got = load_ranks(dst)
    assert len(got) == 2
    for r in range(2):
        assert list(got[r]["module"]) == list(ref[r]["module"])
        for k, v in ref[r]["module"].items():
            assert torch.equal(got[r]["module"][k], v), (r, k)
        meta, want = got[r][META_KEY], ref[r][META_KEY]
        assert meta["tp_size"] == 2 and meta["reshard"] == {"source_tp": 1, "optimizer": "none"}
        for k in ("model", "model_config", "padded_vocab_size", "vocab_size", "step",
                  "consumed_samples", "seed", "partition_spec"):
            assert meta[k] == want[k], k
        assert got[r]["mp_world_size"] == 2 and got[r]["checkpoint_parallel_dimensions"]["tp_degree"] == 2
        assert got[r]["lr_scheduler"] == {"last": 5} and got[r]["optimizer"] is None


def merged(ranks: list[dict]) -> dict:
    """The full (TP=1) tensors of a checkpoint's ranks: weights and optimizer moments."""
    spec = ranks[0][META_KEY]["partition_spec"]

    def merge(key, pieces):
        return merge_shards(pieces, *spec[key]) if key in spec else pieces[0]
    out = {k: merge(k, [r["module"][k] for r in ranks]) for k in ranks[0]["module"]}
    names = list(ranks[0]["module"])
    for i, entry in (ranks[0]["optimizer"] or {"state": {}})["state"].items():
        for k, v in entry.items():
            out[f"optimizer.{i}.{k}"] = merge(names[i], [r["optimizer"]["state"][i][k]
                                                         for r in ranks]) if v.dim() else v
    return out


@pytest.mark.parametrize("path", [[1, 2, 4, 1], [4, 2, 1]])
def test_round_trips_are_bit_identical(tmp_path, path):
    src = write_checkpoint(tmp_path / "start", path[0], optimizer=True)
    original = merged(load_ranks(src))
    current = src
    for i, tp in enumerate(path[1:]):
        nxt = str(tmp_path / f"hop{i}_tp{tp}")
        code, _, err = run_change_mp([current, tp, "--out", nxt, "--keep-optimizer", "--quiet"])
        assert code == 0, err
        current = nxt
        ranks = load_ranks(current)
        assert len(ranks) == tp and all(r[META_KEY]["tp_size"] == tp for r in ranks)
        for rank in ranks:  # the moments were cut exactly like their parameters
            for i_p, p in enumerate(rank["module"].values()):
                entry = rank["optimizer"]["state"][i_p]
                assert torch.equal(entry["exp_avg"], p / 2) and torch.equal(entry["exp_avg_sq"], p * p)
                assert entry["step"] == 5
        now = merged(ranks)
        assert list(now) == list(original)
        assert all(torch.equal(now[k], original[k]) for k in original), f"after TP={tp}"


def test_replicated_tensors_are_copied_from_rank_0(tmp_path):
    src = write_checkpoint(tmp_path / "tp4", 4)
    reshard_checkpoint(src, 2, str(tmp_path / "out"))
    before, after = load_ranks(src), load_ranks(tmp_path / "out")
    for name in ("position_embeddings.weight", "layers.0.ln_attn.weight", "layers.1.attn.out.bias"):
        for rank in after:
            assert torch.equal(rank["module"][name], before[0]["module"][name])


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message, a non-zero exit, nothing written.

def _no_metadata(tmp_path):
    src = write_checkpoint(tmp_path / "ck", 2)
    path = model_state_path(os.path.join(src, TAG), 0)
    state = torch.load(path, weights_only=True)
    del state[META_KEY]
    torch.save(state, path)
    return src, 1


def _heads(tmp_path):  # 4 heads do not split 8 ways (the padded vocab 256 and FFN 64 would)
    return write_checkpoint(tmp_path / "ck", 2), 8


def _ffn(tmp_path):  # FFN 34 splits 2 ways, not 4 (heads 4 and padded vocab 256 would)
    return write_checkpoint(tmp_path / "ck", 2, model_config(ffn_hidden_size=34)), 4


def _padded_vocab(tmp_path):  # 6 heads and FFN 48 split 3 ways; the padded vocab 256 does not
    cfg = model_config(hidden_size=48, num_attention_heads=6, ffn_hidden_size=48)
    return write_checkpoint(tmp_path / "ck", 1, cfg), 3


def _missing_shard(tmp_path):
    src = write_checkpoint(tmp_path / "ck", 2)
    os.remove(model_state_path(os.path.join(src, TAG), 1))
    return src, 1


def _truncated_shard(tmp_path):
    src = write_checkpoint(tmp_path / "ck", 2)
    path = model_state_path(os.path.join(src, TAG), 1)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return src, 4


def _shape_vs_config(tmp_path):  # the metadata claims FFN 128; the weights have 64
    src = write_checkpoint(tmp_path / "ck", 2)
    for r in range(2):
        path = model_state_path(os.path.join(src, TAG), r)
        state = torch.load(path, weights_only=True)
        state[META_KEY]["model_config"]["ffn_hidden_size"] = 128
        torch.save(state, path)
    return src, 1


def _existing_output(tmp_path):
    src = write_checkpoint(tmp_path / "ck", 2)
    os.makedirs(f"{src}_MP1")
    return src, 1


def _optimizer_missing(tmp_path):  # --keep-optimizer on a checkpoint without optimizer state
    return write_checkpoint(tmp_path / "ck", 2), 1


BAD_INPUT = {
    "no metadata": (_no_metadata, [], "no 'megatron_lite' metadata"),
    "heads": (_heads, [], "num_attention_heads"),
    "ffn": (_ffn, [], "ffn_hidden_size"),
    "padded vocab": (_padded_vocab, [], "padded vocabulary"),
    "missing shard": (_missing_shard, [], "mp_rank_01_model_states.pt is missing"),
    "truncated shard": (_truncated_shard, [], "truncated"),
    "shape vs config": (_shape_vs_config, [], "layers.0.mlp.fc1.weight has shape (32, 32), but the config"),
    "existing output": (_existing_output, [], "already exists"),
    "no optimizer state": (_optimizer_missing, ["--keep-optimizer"], "holds no optimizer state"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, case):
    make, extra, message = BAD_INPUT[case]
    src, target = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    tag_files = sorted(os.listdir(os.path.join(src, TAG)))
    code, out, err = run_change_mp([src, target, *extra])
    assert code == 1, (out, err)
    assert message in err, err
    assert "nothing was written" in err
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary directory
    assert sorted(os.listdir(os.path.join(src, TAG))) == tag_files


def test_not_a_checkpoint_directory(tmp_path):
    code, _, err = run_change_mp([tmp_path / "nowhere", 2])
    assert code == 1 and "is not a directory" in err
    os.makedirs(tmp_path / "empty")
    code, _, err = run_change_mp([tmp_path / "empty", 2])
    assert code == 1 and "latest" in err


def test_change_mp_does_not_import_deepspeed(tmp_path):
    src = write_checkpoint(tmp_path / "ck", 2)
    code = ("import sys, change_mp; change_mp.main([sys.argv[1], '1', '--quiet']); "
            "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'")
    proc = subprocess.run([sys.executable, "-c", code, src], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(model_state_path(os.path.join(f"{src}_MP1", TAG), 0))


# ---------------------------------------------------------------------------------------------
# Resuming from what change_mp.py wrote, and DeepSpeed's universal-checkpoint info

def _resharded(tmp_path, keep_optimizer):
    name = "opt" if keep_optimizer else "weights"
    src = write_checkpoint(tmp_path / f"{name}_src", 2, optimizer=True)
    out = str(tmp_path / name)
    reshard_checkpoint(src, 1, out, keep_optimizer=keep_optimizer)
    return out


def test_resume_engine_config(tmp_path):
    zero = lambda stage: {"zero_optimization": {"stage": stage}}  # noqa: E731
    weights = _resharded(tmp_path, keep_optimizer=False)
    with pytest.raises(ValueError, match="--finetune"):
        resume_engine_config(weights, zero(0), 1, finetune=False)
    assert resume_engine_config(weights, zero(0), 1, finetune=True) == zero(0)

    native = _resharded(tmp_path, keep_optimizer=True)
    assert resume_engine_config(native, zero(0), 1, finetune=False) == zero(0)
    with pytest.raises(ValueError, match="stage 0"):
        resume_engine_config(native, zero(1), 1, finetune=False)

    # A checkpoint whose optimizer was written in the universal layout (from ZeRO-1/2/3).
    universal = tmp_path / "universal"
    os.rename(weights, universal)
    path = model_state_path(os.path.join(universal, TAG), 0)
    state = torch.load(path, weights_only=True)
    state[META_KEY]["reshard"]["optimizer"] = "universal"
    torch.save(state, path)
    got = resume_engine_config(str(universal), zero(2), 2, finetune=False)
    assert got == {"zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": True}}
    with pytest.raises(ValueError, match="ZeRO stage 1 or 2"):
        resume_engine_config(str(universal), zero(0), 1, finetune=False)
    with pytest.raises(ValueError, match="tensor-parallel size 1"):
        resume_engine_config(str(universal), zero(3), 2, finetune=False)
    assert resume_engine_config(str(universal), zero(3), 1, finetune=False)["checkpoint"] == \
        {"load_universal": True}
    # Checkpoints change_mp.py did not write are left to the normal load path.
    plain = write_checkpoint(tmp_path / "plain", 1)
    assert resume_engine_config(plain, zero(1), 1, finetune=False) == zero(1)


def test_universal_checkpoint_info_names_every_parameter_exactly():
    ps = ParallelState.virtual(2, 0)
    model = GPTModel(model_config(), ps, RNGContext(0))
    spec = {n: [p.partition_dim, p.partition_stride] for n, p in model.named_parameters()
            if is_sharded(p)}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    info = universal_checkpoint_info(spec, shapes, list(shapes), 2)
    replicated = info["tp_replicated_parameter_patterns"]
    row = info["parameter_with_row_parallelism_patterns"]
    assert r"^layers\.0\.ln_attn\.weight$" in replicated and r"^final_ln\.bias$" in replicated
    assert r"^layers\.1\.attn\.out\.weight$" in row and r"^layers\.0\.mlp\.fc2\.weight$" in row
    assert r"^layers\.0\.attn\.out\.bias$" in replicated  # a row-parallel layer's bias is whole
    assert len(replicated) + len(row) + sum(1 for _, (d, _s) in spec.items() if d == 0) == len(shapes)
    assert not any(k.startswith("vocabulary") for k in info)  # padding is ours, never stripped
    # Strided shards are sub-parameters with their per-rank widths (DeepSpeed's format 0.4).
    info = universal_checkpoint_info({"w": [0, 3]}, {"w": (6, 4)}, ["w"], 2)
    assert info["parameter_with_sub_params"] == [
        {"patterns": ["^w$"], "shape": [(4, 4, 4), 4], "partition_dim": 0}]
    assert info["sub_param_shard_widths"] == {"^w$": [[2, 2], [2, 2], [2, 2]]}


def test_reshard_error_is_a_value_error():
    assert issubclass(ReshardError, ValueError)
