"""What the launcher hands a rank, and what a rank does with it: hostfiles DeepSpeed can read,
threads split between the ranks of a machine, a clear error for a world TP x DP cannot fill.
(`--local_rank` is covered in tests/training/test_config.py.)"""
import contextlib
import io
import os
import subprocess
import sys

from megatron_lite.testing import free_port, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shipped_hostfiles_parse_in_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile
    example = fetch_hostfile(os.path.join(ROOT, "hostfiles", "example"))
    assert dict(example) == {"worker-1": 8, "worker-2": 8}
    assert dict(fetch_hostfile(os.path.join(ROOT, "hostfiles", "localhost"))) == {"localhost": 2}


def test_ranks_split_the_cores_of_their_machine():
    """Under the launcher (LOCAL_SIZE ranks on this machine) each rank takes its share of the
    cores instead of one thread per core each. Two real ranks: DeepSpeed's shared-memory
    collectives wait for LOCAL_SIZE local ranks to arrive."""
    code = ("import os, torch, torch.distributed as dist\n"
            "from megatron_lite.parallel.launch import init_distributed\n"
            "assert init_distributed()\n"
            "print(torch.get_num_threads(), len(os.sched_getaffinity(0)))\n"
            "dist.destroy_process_group()\n")
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(env, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        threads, cores = map(int, out.split()[-2:])
        assert threads == max(1, cores // 2)


def test_a_thread_count_the_user_set_is_kept():
    """OMP_NUM_THREADS wins over the cores-per-rank split: one rank alone on this machine would
    take every core, and keeps the one thread it was given."""
    code = ("import os, torch\n"
            "from megatron_lite.parallel.launch import init_distributed\n"
            "assert init_distributed()\n"
            "print(torch.get_num_threads(), len(os.sched_getaffinity(0)))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "OMP_NUM_THREADS")}
    for omp, expected in (("1", lambda cores: 1), (None, lambda cores: cores)):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, timeout=300,
                             capture_output=True, check=True,
                             env=env if omp is None else dict(env, OMP_NUM_THREADS=omp)).stdout
        threads, cores = map(int, out.split()[-2:])
        assert threads == expected(cores), (omp, threads, cores)


def _run_entry_point(rank, world, argv):
    import pretrain_gpt
    from megatron_lite.training.trainer import run_main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = run_main(lambda: pretrain_gpt.main(argv))
    return status, err.getvalue()


def test_world_that_tp_cannot_fill_is_a_one_line_error(gpt_data):
    argv = ["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
            "--tokenizer", str(gpt_data / "tokenizer"),
            "--train-data-prefix", str(gpt_data / "train"), "--tensor-model-parallel-size", "2"]
    (status, err), = run_distributed(_run_entry_point, 1, argv)
    assert status == 2
    assert err.startswith("error: world size 1 is not divisible by tensor-model-parallel size 2")
    assert "Traceback" not in err


def test_a_finished_command_exits_with_its_status_and_all_its_output(tmp_path):
    """exit_process skips the interpreter's teardown (where gloo's threads can abort a finished
    rank) but not the flushing: buffered stdout, stderr and logging output all arrive."""
    script = (
        "import logging, sys\n"
        "from megatron_lite.parallel.launch import exit_process\n"
        "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
        "logging.info('logged')\n"
        "sys.stdout.write('out'); sys.stderr.write('err')\n"
        "exit_process(3)\n"
        "print('not reached')\n")
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # pipes buffer
    proc = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out", "err")
    assert "logged" in log.read_text()


_FAULTS_OF_REPEATED_STEPS = (
    "import resource, sys, torch\n"
    "from megatron_lite.parallel import launch\n"
    "kept = launch.init_distributed() if sys.argv[1] == 'world' else launch.keep_freed_memory()\n"
    "faults = []\n"
    "for _ in range(12):  # a step's large buffers (MB), made, filled and freed\n"
    "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "    buffers = [torch.ones(mb << 18) for mb in (64, 12, 40, 64, 3)]\n"
    "    del buffers\n"
    "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    "print(kept, min(faults[-4:]))\n")


def test_the_trainer_keeps_freed_memory_for_the_next_step():
    """On CPU the entry points' process setup (`init_distributed`) keeps freed memory in malloc:
    once the first steps have settled the heap (a handful, depending on its layout), the same
    buffers reuse their pages. Fresh ones take a page fault per 4 KB, 46,848 for these: opted
    out, glibc's default, every step pays that again."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("RANK", "WORLD_SIZE", "LD_PRELOAD")}
    runs = {}
    for name, arg, extra in (("trainer", "world", {}),
                             ("opted out", "direct", {"MEGATRON_LITE_KEEP_FREED_MEMORY": "0"})):
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_REPEATED_STEPS, arg], cwd=ROOT,
                             env=dict(env, **extra), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        kept, faults = out.stdout.split()[-2:]
        runs[name] = (kept, int(faults))
    assert runs["trainer"][0] == "True" and runs["trainer"][1] < 1000, runs
    assert runs["opted out"][0] == "False" and runs["opted out"][1] > 20000, runs


def test_malloc_is_left_alone_when_the_user_tunes_it(monkeypatch):
    from megatron_lite.parallel.launch import keep_freed_memory
    monkeypatch.delenv("MEGATRON_LITE_KEEP_FREED_MEMORY", raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert keep_freed_memory() is False
