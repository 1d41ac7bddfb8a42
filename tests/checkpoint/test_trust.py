"""Checkpoints you can trust: a manifest checked on load (with fallback to the newest checkpoint
that verifies), pickles scanned with weights_only before DeepSpeed opens them, a full disk that
loses nothing, and kill -9 at any moment of per-step saves.

The trainer runs share spawned gloo ranks (module fixtures): start-up costs more than the tiny
steps. The 20-kill loop is `slow`."""
import contextlib
import errno
import io
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_lite.checkpoint.verify import (MANIFEST, CheckpointInvalid, select_tag, verify_tag,
                                             write_manifest)
from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Evil:
    """Pickles as a call of os.system: what weights_only must refuse before anything runs it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def gpt_args(data, save, *extra):
    return ["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
            "--tokenizer", str(data / "tokenizer"), "--train-data-prefix", str(data / "train"),
            "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--lr", "3e-3", "--lr-warmup-iters", "0", "--save", str(save), "--peak-flops", "1e12",
            "--no-progress-bar", "--eval-interval", "none", "--log-interval", "1", *extra]


# ---------------------------------------------------------------------------------------------
# The manifest and the pickle scan, on files alone

def make_tag(path):
    os.makedirs(path / "tokenizer")
    torch.save({"module": {"w": torch.arange(1000.0)}}, path / "mp_rank_00_model_states.pt")
    (path / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    write_manifest(str(path))
    return path


def test_a_tag_verifies_against_its_manifest_and_names_what_is_wrong(tmp_path):
    tag = make_tag(tmp_path / "global_step1")
    assert verify_tag(str(tag)) is None
    model = tag / "mp_rank_00_model_states.pt"
    data = model.read_bytes()
    model.write_bytes(data[:-100])
    with pytest.raises(CheckpointInvalid, match="mp_rank_00_model_states.pt has .* bytes.*trunc"):
        verify_tag(str(tag))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointInvalid, match="mp_rank_00_model_states.pt does not match its crc32"):
        verify_tag(str(tag))
    model.write_bytes(data)
    os.remove(tag / "tokenizer" / "vocab.txt")
    with pytest.raises(CheckpointInvalid, match="vocab.txt is missing"):
        verify_tag(str(tag))


def test_a_malicious_pickle_is_refused_by_name_and_never_runs(tmp_path):
    tag = make_tag(tmp_path / "global_step1")
    marker = tmp_path / "pwned"
    torch.save({"module": Evil(str(marker))}, tag / "mp_rank_00_model_states.pt")
    write_manifest(str(tag))  # the attacker rewrites the manifest too: the scan still refuses
    with pytest.raises(CheckpointInvalid, match=r"mp_rank_00_model_states.pt: refused.*system"):
        verify_tag(str(tag))
    assert not marker.exists()


def test_an_older_checkpoint_without_manifest_loads_with_a_warning(tmp_path):
    tag = make_tag(tmp_path / "global_step1")
    os.remove(tag / MANIFEST)
    assert "no manifest.json" in verify_tag(str(tag))


def test_selection_falls_back_to_the_newest_tag_that_verifies(tmp_path):
    for step in (1, 2, 3):
        make_tag(tmp_path / f"global_step{step}")
    for step in (3, 2):  # the two newest are truncated
        f = tmp_path / f"global_step{step}" / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:50])
    older = ["global_step3", "global_step2", "global_step1"]
    tag, notes = select_tag(str(tmp_path), "global_step3", older)
    assert tag == "global_step1"
    assert [n.split(":")[0] for n in notes[:2]] == ["skipped global_step3", "skipped global_step2"]
    assert "loading global_step1 instead of global_step3" in notes[-1]
    with pytest.raises(CheckpointInvalid, match="global_step3.*without --no-load-fallback"):
        select_tag(str(tmp_path), "global_step3", older, fallback=False)
    (tmp_path / "global_step1" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointInvalid, match="no checkpoint in .* verifies"):
        select_tag(str(tmp_path), "global_step3", older)


# ---------------------------------------------------------------------------------------------
# The trainer's --load, generate.py and change_mp.py

def _load_runs(rank, world, base_argv, save, marker):
    import pretrain_gpt
    from megatron_lite.errors import ConfigError
    from megatron_lite.training.config import parse_config
    from megatron_lite.models import get_model_spec
    from megatron_lite.training.trainer import Trainer

    pretrain_gpt.main(base_argv + ["--train-iters", "3", "--save-interval", "1"])
    spec = get_model_spec("gpt")
    out = {}

    def resume(*extra):
        run = parse_config(base_argv + ["--train-iters", "4", "--load", save, *extra],
                           spec.config_cls)
        try:
            trainer = Trainer(run, spec)
            return ("ok", trainer.load_tag, list(trainer.notes), trainer.step)
        except ConfigError as e:
            return ("error", str(e))

    model = os.path.join(save, "global_step3", "mp_rank_00_model_states.pt")
    data = open(model, "rb").read()
    with open(model, "wb") as f:
        f.write(data[:len(data) // 2])
    out["truncated"] = resume()
    out["truncated_no_fallback"] = resume("--no-load-fallback")
    torch.save({"module": Evil(marker)}, model)
    write_manifest(os.path.dirname(model))
    out["evil"] = resume()
    out["evil_no_fallback"] = resume("--no-load-fallback")
    return out


@pytest.fixture(scope="module")
def load_runs(gpt_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust_load")
    save = str(root / "run")
    marker = str(root / "pwned")
    (out,) = run_distributed(_load_runs, 1, gpt_args(gpt_data, save), save, marker)
    out["save"], out["marker"] = save, marker
    return out


def test_load_falls_back_past_a_truncated_checkpoint_and_says_so(load_runs):
    status, tag, notes, step = load_runs["truncated"]
    assert status == "ok" and tag == "global_step2" and step == 2
    assert any("skipped global_step3" in n and "mp_rank_00_model_states.pt" in n for n in notes)
    status, message = load_runs["truncated_no_fallback"]
    assert status == "error" and "\n" not in message
    assert "global_step3/mp_rank_00_model_states.pt has" in message


def test_load_never_unpickles_a_tampered_file(load_runs):
    status, tag, notes, _ = load_runs["evil"]
    assert status == "ok" and tag == "global_step2"
    assert any("refused" in n and "system" in n for n in notes)
    status, message = load_runs["evil_no_fallback"]
    assert status == "error" and "refused" in message
    assert not os.path.exists(load_runs["marker"])


def test_generate_and_change_mp_verify_too(load_runs, tmp_path):
    import change_mp
    import generate
    from megatron_lite.parallel import ParallelState
    with pytest.raises(SystemExit, match="global_step3/mp_rank_00_model_states.pt: refused"):
        generate.read_model(load_runs["save"], ParallelState.single())
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        change_mp.main([load_runs["save"], "2", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1 and "refused" in err.getvalue()
    assert not (tmp_path / "out").exists() and not os.path.exists(load_runs["marker"])


# ---------------------------------------------------------------------------------------------
# A full disk: ENOSPC injected at every write of a save, on one rank

class Injector:
    """Counts the writes of a save (every torch.save, DeepSpeed's recovery-script copy, the
    tokenizer, the manifest and `latest`) and raises ENOSPC at write number `fail_at`."""

    def __init__(self, trainer, fail_at=None):
        import megatron_lite.checkpoint.checkpointing as ck
        self.ck, self.trainer, self.fail_at, self.calls = ck, trainer, fail_at, 0
        engine_cls = type(trainer.engine)
        self.originals = [(torch, "save", torch.save), (ck, "write_manifest", ck.write_manifest),
                          (ck, "_write_synced", ck._write_synced),
                          (engine_cls, "_copy_recovery_script", engine_cls._copy_recovery_script)]
        if trainer.rank0 and trainer.tokenizer is not None:
            self.originals.append((trainer.tokenizer, "save", trainer.tokenizer.save))

    def _wrap(self, fn):
        def write(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "injected")
            return fn(*args, **kwargs)
        return write

    def __enter__(self):
        for owner, name, fn in self.originals:
            setattr(owner, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self.originals:
            setattr(owner, name, fn)
        if self.trainer.tokenizer is not None and "save" in vars(self.trainer.tokenizer):
            del self.trainer.tokenizer.save


def _enospc(rank, world, argv, save):
    import torch.distributed as dist
    from megatron_lite.checkpoint.checkpointing import CheckpointSaveError, read_latest_tag
    from megatron_lite.models import get_model_spec
    from megatron_lite.training.config import parse_config
    from megatron_lite.training.trainer import Trainer

    signal.alarm(240)  # a rank left waiting in a barrier fails the test instead of hanging it
    spec = get_model_spec("gpt")
    trainer = Trainer(parse_config(argv, spec.config_cls), spec)
    trainer.train_step()
    trainer.save()
    with Injector(trainer) as counting:
        trainer.step = 2
        trainer.save()
    writes = [0] * world
    dist.all_gather_object(writes, counting.calls)
    attempts = []
    for fail_rank in range(world):
        for k in range(1, writes[fail_rank] + 1):
            trainer.step = 100 * (fail_rank + 1) + k
            start = time.monotonic()
            try:
                with Injector(trainer, k if rank == fail_rank else None):
                    trainer.save()
                outcome = "saved"
            except CheckpointSaveError as e:
                outcome = str(e)
            dist.barrier()
            leftovers = sorted(n for n in os.listdir(save) if n.endswith(".tmp"))
            attempts.append(dict(fail_rank=fail_rank, k=k, outcome=outcome,
                                 seconds=time.monotonic() - start, latest=read_latest_tag(save),
                                 leftovers=leftovers,
                                 tags=sorted(n for n in os.listdir(save) if "step" in n)))
    trainer.step = 999
    trainer.save()  # the disk is fine again: saving works
    signal.alarm(0)
    return dict(writes=writes, attempts=attempts, final=read_latest_tag(save))


@pytest.mark.parametrize("world", [1, 2])
def test_a_full_disk_at_any_write_loses_nothing_and_every_rank_stops(gpt_data, tmp_path, world):
    save = str(tmp_path / "run")
    zero = ["--deepspeed", "--deepspeed_config", os.path.join(ROOT, "configs/deepspeed/zero1.json")]
    results = run_distributed(_enospc, world, gpt_args(gpt_data, save, "--train-iters", "5",
                                                       *zero), save)
    for rank, result in enumerate(results):
        # rank 0 writes its model and optimizer states, the tokenizer, the manifest and latest;
        # another rank its optimizer shard
        assert result["writes"][0] >= 5 and all(w >= 1 for w in result["writes"])
        assert len(result["attempts"]) == sum(result["writes"])
        for attempt in result["attempts"]:
            message = attempt["outcome"]
            assert message != "saved", attempt  # every write fails the whole save, on all ranks
            assert "\n" not in message and "No space left on device" in message
            assert f"global_step{100 * (attempt['fail_rank'] + 1) + attempt['k']}" in message
            assert "bytes" in message and f"--load {save}" in message
            assert attempt["latest"] == "global_step2" and attempt["leftovers"] == []
            assert attempt["tags"] == ["global_step1", "global_step2"]
            assert attempt["seconds"] < 60
        assert result["final"] == "global_step999"
    assert verify_tag(os.path.join(save, "global_step2")) is None


def test_a_failed_save_is_a_one_line_error_and_exit_status_1(capsys):
    from megatron_lite.checkpoint.checkpointing import CheckpointSaveError
    from megatron_lite.training.trainer import run_main

    def main():
        raise CheckpointSaveError("cannot save checkpoint runs/x/global_step3: no space")
    assert run_main(main) == 1
    assert capsys.readouterr().err == "error: cannot save checkpoint runs/x/global_step3: no space\n"


# ---------------------------------------------------------------------------------------------
# kill -9 during per-step saves

def kill_during_saves(data, save, seed: int) -> None:
    """Start a run that saves every step and SIGKILL it at a seeded moment once it saves."""
    cmd = [sys.executable, "pretrain_gpt.py", *gpt_args(data, save, "--train-iters", "200",
                                                         "--save-interval", "1")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(save, "latest")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never saved"
            time.sleep(0.05)
        time.sleep(random.Random(seed).uniform(0.0, 1.5))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _resume_all(rank, world, calls):
    import pretrain_gpt
    return [pretrain_gpt.main(argv) for argv in calls]


def kill_and_resume(data, root, seeds):
    saves = [str(root / f"run{seed}") for seed in seeds]
    for seed, save in zip(seeds, saves):
        kill_during_saves(data, save, seed)
    newest = []
    for save in saves:
        from megatron_lite.checkpoint.checkpointing import read_latest_tag
        tag = read_latest_tag(save)  # `latest` always names a complete, verifying checkpoint
        assert verify_tag(os.path.join(save, tag)) is None, save
        newest.append(int(tag.removeprefix("global_step")))
    calls = [gpt_args(data, save, "--train-iters", str(step + 1), "--load", save)
             for save, step in zip(saves, newest)]
    results = run_distributed(_resume_all, 1, calls)[0]
    for result, step in zip(results, newest):
        assert result["step"] == step + 1 and len(result["loss"]) == 1  # one clean step on top
    return newest


def test_kill_9_during_per_step_saves_leaves_a_loadable_checkpoint(gpt_data, tmp_path):
    kill_and_resume(gpt_data, tmp_path, seeds=[1, 2, 3])


@pytest.mark.slow
def test_kill_9_twenty_times(gpt_data, tmp_path):
    kill_and_resume(gpt_data, tmp_path, seeds=list(range(100, 120)))
