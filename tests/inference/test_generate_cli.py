"""generate.py as a command: --prompt / --input-file batches, --output-file JSON lines, the
interactive loop (TP=1 and TP=2, where rank 0 reads and shares each prompt), --export
safetensors (loadable at any TP size, without pickle), the TP-mismatch error, and
scripts/generate_text.sh.

The session's trained tiny GPT (TP=2) is the checkpoint; its reshard to TP=1 runs in one
process. Each world size runs its invocations in one spawn (module fixture)."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from megatron_lite.checkpoint.checkpointing import META_KEY, model_state_path
from megatron_lite.checkpoint.reshard import reshard_checkpoint
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.inference.export import export_safetensors
from megatron_lite.parallel import merge_shards
from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GREEDY = ["--greedy", "--max-new-tokens", "12"]
SAMPLED = ["--top-k", "20", "--top-p", "0.9", "--temperature", "0.8", "--repetition-penalty",
           "1.2", "--seed", "5", "--max-new-tokens", "12", "--json"]
TYPED = "中国人民\n\n北京\nstop\n"  # an empty line is skipped; "stop" ends the loop


def _session(rank, world, calls):
    """Run `generate.main(argv)` for each (argv, stdin) on this rank; stdin goes to rank 0."""
    import generate
    outputs = []
    for argv, stdin in calls:
        buf, saved = io.StringIO(), sys.stdin
        if stdin is not None and rank == 0:
            sys.stdin = io.StringIO(stdin)
        error, results = None, None
        try:
            with contextlib.redirect_stdout(buf):
                results = generate.main(argv)
        except SystemExit as e:
            error = str(e.code)
        finally:
            sys.stdin = saved
        outputs.append((buf.getvalue(), error,
                        [(r["prompt"], r["completion"], r["ids"]) for r in results or []]))
    return outputs


@pytest.fixture(scope="module")
def cli(tiny_gpt_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_cli")
    tp2 = str(tiny_gpt_checkpoint)
    tp1 = str(root / "tp1")
    reshard_checkpoint(tp2, 1, tp1)
    export = str(root / "export")
    export_safetensors(tp2, export)
    prompts = root / "prompts.txt"
    prompts.write_text('中国人民\n\n{"prompt": "北京"}\n今天天气\n', encoding="utf-8")
    out = {name: str(root / f"{name}.jsonl") for name in ("batch", "typed1", "typed2")}
    # one[call], two[rank][call]: (stdout, error, [(prompt, completion, ids)])
    one = run_distributed(_session, 1, [
        (["--load", tp1, "--prompt", "你好", "--input-file", str(prompts), "--output-file",
          out["batch"], "--batch-size", "2", *GREEDY], None),
        (["--load", tp1, "--output-file", out["typed1"], *GREEDY], TYPED),
        (["--load", export, "--prompt", "中国人民", "--prompt", "北京", *GREEDY], None),
        (["--load", tp2, "--prompt", "中国人民"], None),
        (["--load", tp1, "--prompt", "中国人民", "--prompt", "今天", *SAMPLED], None),
    ])[0]
    two = run_distributed(_session, 2, [
        (["--load", tp2, "--output-file", out["typed2"], *GREEDY], TYPED),
        (["--load", export, "--prompt", "中国人民", "--prompt", "北京", *GREEDY], None),
        (["--load", tp2, "--prompt", "中国人民", "--prompt", "今天", *SAMPLED], None),
    ])
    return dict(tp1=tp1, tp2=tp2, export=export, out=out, one=one, two=two)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_prompts_from_flags_and_file_to_json_lines(cli):
    stdout, error, results = cli["one"][0]
    assert error is None
    assert [r[0] for r in results] == ["你好", "中国人民", "北京", "今天天气"]
    assert all(1 <= len(ids) <= 12 for _, _, ids in results)
    rows = read_jsonl(cli["out"]["batch"])
    assert rows == [{"prompt": p, "completion": c} for p, c, _ in results]
    assert stdout.splitlines() == [p + c for p, c, _ in results]


def test_interactive_loop_at_tp1_and_tp2(cli):
    batch = {p: c for p, c, _ in cli["one"][0][2]}
    stdout, error, typed = cli["one"][1]
    assert error is None and [r[0] for r in typed] == ["中国人民", "北京"]
    assert "Context prompt (stop to exit) >>> " in stdout
    # Greedy: the same continuation as in batch mode, at TP=1 and on both ranks at TP=2.
    assert [c for _, c, _ in typed] == [batch["中国人民"], batch["北京"]]
    rank0, rank1 = cli["two"][0][0], cli["two"][1][0]
    assert rank0[2] == rank1[2] == typed
    assert rank1[0] == ""  # only rank 0 prints
    assert read_jsonl(cli["out"]["typed1"]) == read_jsonl(cli["out"]["typed2"]) == \
        [{"prompt": p, "completion": c} for p, c, _ in typed]


def test_sampling_agrees_across_tp(cli):
    tp1 = cli["one"][4]
    assert tp1[1] is None
    lines = [json.loads(line) for line in tp1[0].splitlines()]
    assert [r["prompt"] for r in lines] == ["中国人民", "今天"]
    assert tp1[0] == cli["two"][0][2][0]  # same seed, same logits: same draws at TP=2


def test_tp_mismatch_names_the_change_mp_command(cli):
    _, error, _ = cli["one"][3]
    assert "saved at tensor-parallel size 2 but this run has 1" in error
    assert f"python change_mp.py {cli['tp2']} 1" in error


def test_export_is_merged_weights_config_and_tokenizer_without_pickle(cli):
    export = cli["export"]
    assert sorted(os.listdir(export)) == ["config.json", "model.safetensors", "tokenizer"]
    with open(os.path.join(export, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    ranks = [torch.load(model_state_path(os.path.join(cli["tp2"], "global_step60"), r),
                        weights_only=True) for r in range(2)]
    meta = ranks[0][META_KEY]
    assert config["model"] == "gpt" and config["model_config"] == meta["model_config"]
    assert config["padded_vocab_size"] == meta["padded_vocab_size"]
    assert config["partition_spec"] == meta["partition_spec"]
    with safe_open(os.path.join(export, "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(ranks[0]["module"])
        for key in f.keys():
            shards = [r["module"][key] for r in ranks]
            full = merge_shards(shards, *meta["partition_spec"][key]) \
                if key in meta["partition_spec"] else shards[0]
            assert torch.equal(f.get_tensor(key), full), key
    assert load_tokenizer(os.path.join(export, "tokenizer")).hash == meta["tokenizer_hash"]
    # Generation from the export at TP=1 and TP=2 equals the checkpoint's.
    batch = {p: c for p, c, _ in cli["one"][0][2]}
    for _, error, results in (cli["one"][2], cli["two"][0][1], cli["two"][1][1]):
        assert error is None
        assert [(p, c) for p, c, _ in results] == [("中国人民", batch["中国人民"]),
                                                   ("北京", batch["北京"])]


def test_export_refuses_an_existing_directory(cli, tmp_path):
    code = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--load",
                           cli["tp2"], "--export", "safetensors", cli["export"]],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert code.returncode != 0 and "already exists" in code.stderr


# ---------------------------------------------------------------------------------------------
# scripts/generate_text.sh

def script(ckpt, *args, env=None, stdin=None, timeout=120):
    full = {k: v for k, v in os.environ.items() if k not in ("MP_SIZE", "MPSIZE", "DRY_RUN")}
    full.update(OMP_NUM_THREADS="1",
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **(env or {}))
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "generate_text.sh"), str(ckpt),
                           *args], cwd=ROOT, env=full, input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_script_reads_the_model_parallel_size_from_the_checkpoint(cli):
    dry = {"DRY_RUN": "1"}
    tp2 = script(cli["tp2"], "--greedy", env=dry).stdout.split()
    assert tp2[:3] == ["deepspeed", "--num_gpus", "2"] and tp2[-1] == "--greedy"
    assert script(cli["tp1"], env=dry).stdout.split()[1] == "generate.py"
    assert script(cli["export"], env=dry).stdout.split()[1] == "generate.py"
    # MP_SIZE, or Chinese-Transformer-XL's spelling MPSIZE, overrides it (MP_SIZE wins).
    assert script(cli["tp2"], env={**dry, "MPSIZE": "1"}).stdout.split()[1] == "generate.py"
    assert script(cli["tp1"], env={**dry, "MP_SIZE": "4", "MPSIZE": "1"}).stdout.split()[2] == "4"
    assert "--temperature 0.9 --top-k 0 --top-p 0.9" in script(cli["tp1"], env=dry).stdout


def test_script_runs_one_process_at_tp1(cli):
    proc = script(cli["tp1"], "--prompt", "中国人民", "--greedy", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    batch = {p: c for p, c, _ in cli["one"][0][2]}
    assert proc.stdout.splitlines()[-1] == "中国人民" + batch["中国人民"]


@pytest.mark.launcher
def test_script_interactive_at_tp2_under_the_launcher(cli):
    from megatron_lite.testing import free_port
    proc = script(cli["tp2"], "--greedy", "--max-new-tokens", "12", stdin=TYPED,
                  env={"MASTER_PORT": str(free_port())}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    batch = {p: c for p, c, _ in cli["one"][0][2]}
    for prompt in ("中国人民", "北京"):
        assert f"{prompt}{batch[prompt]}" in proc.stdout
