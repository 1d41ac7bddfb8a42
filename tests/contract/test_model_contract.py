"""The model contract end to end, with two architectures the package has never heard of
(tests/contract/toy_models.py, given as --model-module): without editing any package file they
train through the generic driver (in-process and under the deepspeed CLI), resume exactly, reshard
with change_mp.py, and meet generate.py, which says an encoder does not generate. The stateful
one resumes bit-exactly only because its per-stream state is saved.

The in-process runs share one spawned rank (module fixture): process start-up and DeepSpeed's
import cost more than the tiny steps."""
import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_lite.testing import free_port, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = os.path.join(ROOT, "tests", "contract", "toy_models.py")
COMMON = ["--seq-length", "32", "--lr", "3e-3", "--lr-warmup-iters", "2", "--peak-flops", "1e12",
          "--no-progress-bar", "--log-interval", "1", "--eval-iters", "2", "--seed", "9"]


def mlm_args(data, save, *extra, iters=6):
    return ["--model-module", TOY, "--model", "toy_mlm", "--tokenizer", data.bert_tokenizer_dir,
            "--train-data-prefix", data.bert_prefix, "--valid-data-prefix", data.bert_prefix,
            "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", str(iters),
            "--eval-interval", "3", "--save", str(save), *COMMON, *extra]


def counter_args(data, save, *extra, iters=6):
    # Two micro-batch slots per step (accumulation 2): each carries its own state.
    return ["--model-module", TOY, "--model", "toy_counter",
            "--tokenizer", str(data / "tokenizer"), "--train-data-prefix", str(data / "train"),
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--eval-interval", "none", "--save", str(save), *COMMON, *extra]


def _runs(rank, world, calls):
    """`main(argv)` of each (module, argv) in this rank; a SystemExit or a ConfigError (exit
    status 2 from the command line) is returned, not raised."""
    import importlib
    from megatron_lite.errors import ConfigError
    out = []
    for module, argv in calls:
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
                result = importlib.import_module(module).main(argv)
            if isinstance(result, dict):
                result = {k: result[k] for k in ("step", "loss", "valid_loss", "valid_bpc",
                                                 "stop_reason")}
            out.append(("ok", None if not isinstance(result, dict) else result))
        except SystemExit as e:
            # A message as the exit code is printed and exits with status 1, as in the shell.
            status = 1 if isinstance(e.code, str) else e.code
            out.append((f"exit {status}", f"{e.code}\n{stdout.getvalue()}"))
        except ConfigError as e:
            out.append(("exit 2", str(e)))
    return out


@torch.no_grad()
def _logits(rank, world, load_dir, ids):
    """Full-vocabulary logits of the toy encoder of `load_dir` at TP=`world`."""
    from megatron_lite.checkpoint.checkpointing import read_model_states
    from megatron_lite.models.registry import get_model_spec, import_model_modules
    from megatron_lite.parallel import ParallelState, RNGContext, gather_full_logits
    import_model_modules([TOY])
    ps = ParallelState.single() if world == 1 else ParallelState.from_world(world)
    state, meta, _ = read_model_states(load_dir, ps.tp_rank)
    spec = get_model_spec(meta.model, module=meta.model_module)
    model = spec.build(spec.make_config(meta.model_config), ps, RNGContext(0, 0, ps.tp_rank))
    model.load_state_dict(state, strict=True)
    return gather_full_logits(model.eval()(ids, torch.ones_like(ids)), ps, model.cfg.vocab_size)


@pytest.fixture(scope="module")
def runs(sample_data, gpt_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    mlm, counter = root / "mlm", root / "counter"
    calls = [
        ("pretrain", mlm_args(sample_data, mlm / "full")),
        ("pretrain", mlm_args(sample_data, mlm / "part", "--exit-interval", "3")),
        ("pretrain", mlm_args(sample_data, mlm / "part", "--load", str(mlm / "part"))),
        ("change_mp", [str(mlm / "full"), "2", "--model-module", TOY, "--quiet"]),
        ("generate", ["--load", str(mlm / "full"), "--model-module", TOY, "--prompt", "中国"]),
        ("pretrain", mlm_args(sample_data, mlm / "sp", "--sequence-parallel-size", "2")),
        ("pretrain", counter_args(gpt_data, counter / "full")),
        ("pretrain", counter_args(gpt_data, counter / "part", "--exit-interval", "3")),
        ("pretrain", counter_args(gpt_data, counter / "part", "--load", str(counter / "part"),
                                  "--save", str(counter / "resumed"))),
        ("pretrain", counter_args(gpt_data, counter / "part", "--load", str(counter / "part"),
                                  "--save", str(counter / "reset"), "--reset-stream-state")),
    ]
    names = ["mlm_full", "mlm_part", "mlm_resumed", "reshard", "generate", "sequence_parallel",
             "counter_full", "counter_part", "counter_resumed", "counter_reset"]
    out = dict(zip(names, run_distributed(_runs, 1, calls)[0]))
    return root, out


def test_toy_mlm_trains_and_resumes_exactly_through_the_driver(runs):
    _, out = runs
    full, part, resumed = out["mlm_full"][1], out["mlm_part"][1], out["mlm_resumed"][1]
    assert full["step"] == 6 and part["stop_reason"] == "exit_interval"
    assert part["loss"] + resumed["loss"] == full["loss"]  # bit-identical, dropout on
    assert full["loss"][-1] < full["loss"][0]
    # A text-predicting model reports bits per character beside the loss (MLM batches carry
    # -100 labels, no loss_mask).
    assert [s for s, _ in full["valid_loss"]] == [3, 6]
    (_, loss), (_, bpc) = full["valid_loss"][-1], full["valid_bpc"][-1]
    assert resumed["valid_loss"][-1] == full["valid_loss"][-1]
    # A character vocabulary predicts one character per token: bits = nats / ln 2.
    assert bpc == pytest.approx(loss / math.log(2), rel=1e-9)


def test_toy_mlm_checkpoint_records_its_module_and_reshards_to_equal_logits(runs):
    root, out = runs
    from megatron_lite.checkpoint.checkpointing import read_metadata
    meta = read_metadata(str(root / "mlm" / "full"))
    assert (meta.model, meta.model_module, meta.version) == ("toy_mlm", TOY, 2)
    assert out["reshard"][0] == "ok"
    ids = torch.randint(200, 3000, (2, 20), generator=torch.Generator().manual_seed(0))
    one = _logits(0, 1, str(root / "mlm" / "full"), ids)
    two = run_distributed(_logits, 2, str(root / "mlm" / "full_MP2"), ids)[0]
    torch.testing.assert_close(two, one, atol=1e-5, rtol=0)


def test_generate_says_the_encoder_does_not_generate(runs):
    status, message = runs[1]["generate"]
    assert status == "exit 1" and "does not generate" in message and "toy_mlm" in message


def test_a_model_that_does_not_split_sequences_refuses_sequence_parallelism(runs):
    status, message = runs[1]["sequence_parallel"]
    assert status == "exit 2"
    assert message == ("--sequence-parallel-size 2: model 'toy_mlm' does not split sequences "
                       "across ranks; use 1")


def test_tools_never_import_a_module_a_checkpoint_names(runs):
    """A fresh process that was not given --model-module: the tools name the module to pass
    (the checkpoint records it) and write nothing."""
    root, _ = runs
    full = str(root / "mlm" / "full")
    out = run_distributed(_runs, 1, [
        ("change_mp", [full, "2", "--out", str(root / "mlm" / "no_module"), "--quiet"]),
        ("generate", ["--load", full, "--prompt", "中国"])])[0]
    for status, message in out:
        assert status == "exit 1" and f"pass --model-module {TOY}" in message
    assert not (root / "mlm" / "no_module").exists()


def test_stream_state_is_what_makes_resume_exact(runs):
    root, out = runs
    full, part = out["counter_full"][1], out["counter_part"][1]
    resumed, reset = out["counter_resumed"][1], out["counter_reset"][1]
    assert part["step"] == 3 and resumed["step"] == reset["step"] == 6
    assert part["loss"] + resumed["loss"] == full["loss"]  # bit-identical
    # The same weights, optimizer and data position, but every stream's count back at zero:
    # the losses differ, so the saved state (not luck) made the resume exact.
    assert all(a != b for a, b in zip(reset["loss"], resumed["loss"]))
    from megatron_lite.checkpoint.checkpointing import read_metadata, stream_state_path
    tag = root / "counter" / "part" / "global_step3"
    meta = read_metadata(str(root / "counter" / "part"))
    # 4 streams (the global batch), 2 per micro-batch slot; the state is saved by stream row.
    assert meta.stream_state == {"tp_size": 1, "sp_size": 1, "dp_size": 1, "streams": 4}
    assert (meta.data_state["step"], meta.data_state["slot"]) == (3, 0)  # between steps
    saved = torch.load(stream_state_path(str(tag), 0, 0, 0), weights_only=True)["slots"]
    assert [(s["rows"].tolist(), s["state"]["count"].tolist()) for s in saved] == [
        ([0, 1], [3.0, 3.0]), ([2, 3], [3.0, 3.0])]


@pytest.mark.launcher
def test_toy_mlm_trains_under_the_deepspeed_cli(sample_data, tmp_path):
    save = tmp_path / "cli"
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_port()), "pretrain.py",
           *mlm_args(sample_data, save, "--tensor-model-parallel-size", "2", "--eval-interval",
                     "none", iters=3)]
    # As a user writes it in the repository: the module by its relative path.
    cmd[cmd.index(TOY)] = os.path.relpath(TOY, ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (save / "latest").read_text() == "global_step3"
    files = sorted(os.listdir(save / "global_step3"))
    assert files[:3] == ["manifest.json", "mp_rank_00_model_states.pt",
                         "mp_rank_01_model_states.pt"]
    with open(save / "logs" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
