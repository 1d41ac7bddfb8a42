"""Regenerate BENCHMARKS.md: every section's benchmark in one command, or the ones named.

    python benchmarks/run.py                                 # every section (make bench)
    python benchmarks/run.py --section reshard,t5_learning   # some (make bench SECTION=reshard)
    python benchmarks/run.py --quick                         # each on tiny shapes (make bench-quick)
    python benchmarks/run.py --list                          # the sections and their durations

Each section is one script of this directory (train_throughput.py serves one section per
`--model`), run as a child process with the arguments its BENCHMARKS.md block names as its
command; its output goes to a log file (printed), and a bar shows the elapsed time against the
section's expected duration. The durations are estimates, from the wall times of the recorded runs
on the 2-core VM these figures come from; a busy machine takes longer. `--quick` runs each
script's quick variant (tiny shapes, a few training steps, its generated block written into a
scratch copy of BENCHMARKS.md, never the real one): it checks that every benchmark still runs end
to end and renders its block with the provenance lines of benchmarks/report.py, and fails naming
the sections that did not, with the end of their logs.
Quick runs go one per core at a time (`--jobs`), each section's processes pinned to its core, so
that their threads never contend; full runs go one at a time on the whole machine. A quick section
starts as a fork of one interpreter that imported torch, DeepSpeed and transformers once: those
imports took half of a quick run's CPU time when every section paid them.
"""
from __future__ import annotations

import argparse
import os
import queue
import resource
import runpy
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Section:
    script: str
    """The script, in benchmarks/ (or an absolute path)."""
    full: tuple[str, ...]
    """Arguments of the run whose figures BENCHMARKS.md holds (the command its block names)."""
    minutes: float
    """Expected duration of the full run on a quiet 2-core machine (an estimate)."""
    quick: tuple[str, ...]
    """Arguments of the quick check; {tmp} is a scratch directory. `--out {tmp}/BENCHMARKS.md` is
    added: the block is rendered and written, into the scratch copy."""
    quick_seconds: float
    """Expected duration of the quick check on one core of a quiet machine (an estimate: the CPU
    time it took, forked from the preloaded interpreter)."""


OUT = ("--out", "BENCHMARKS.md")
QUICK_WORK = ("--quick", "--work-dir", "{tmp}")
# train_throughput.py --model NAME at a toy size: one step, one thread, no memory probes.
QUICK_THROUGHPUT = ("--shapes", "tiny", "--seq-length", "64", "--warmup", "0", "--steps", "1",
                    "--threads", "1", "--peak-flops", "1e11", "--no-memory")
SECTIONS = {
    "data_pipeline": Section(
        "data_pipeline.py", OUT, 5,
        ("--corpus-docs", "100", "--corpus-copies", "1", "--repeats", "1", "--workers", "1",
         "--rounds", "1", "--min-time", "0.01", "--micro-batch-size", "2", "--work-dir", "{tmp}"),
        5),
    "train_throughput": Section(
        "train_throughput.py", ("--model", "gpt", "--shapes", "tiny", "small", "linglong-106m",
                                "--seq-length", "1024", "256", "1024", "--micro-batch-size", "1",
                                "8", "1", "--warmup", "1", "--steps", "7", *OUT),
        7, ("--model", "gpt", *QUICK_THROUGHPUT), 3),
    # torch.compile, a run of its own (compiled rows slow the other rows of their process). The
    # quick check traces through dynamo and AOT autograd without inductor's code generation (a
    # minute with its cache cold); tests/training/test_compile.py covers inductor.
    "train_throughput_compile": Section(
        "train_throughput.py", ("--model", "gpt", "--compile", "--shapes", "tiny", "linglong-106m",
                                "--seq-length", "1024", "--warmup", "1", "--steps", "7",
                                "--no-memory", *OUT),
        8, ("--model", "gpt", "--compile", "--compile-backend", "aot_eager", "--shapes", "tiny",
            "--seq-length", "64", "--warmup", "1", "--steps", "1", "--threads", "1",
            "--peak-flops", "1e11", "--no-memory"), 10),
    "reshard": Section("reshard.py", OUT, 2,
                       ("--config", "configs/gpt/tiny.yaml", "--vocab-size", "300",
                        "--targets", "1", "--work-dir", "{tmp}"), 5),
    "train_throughput_t5": Section(
        "train_throughput.py", ("--model", "t5", "--steps", "15", "--threads", "1", *OUT), 4,
        ("--model", "t5", "--decoder-seq-length", "16", *QUICK_THROUGHPUT), 4),
    # The largest shapes a full run does within 10 min on 2 cores (estimates from the FLOPs
    # counts: 0.8 and 1.5 TFLOP a step): Longformer_ZH at 1024 of its 4096 tokens, LongNet-base
    # at 2048 of its 32K. Transformer-XL's only other shape (2.9B) needs more memory than the
    # machine has: tiny at 512 tokens with its memory of 128.
    "train_throughput_longformer": Section(
        "train_throughput.py", ("--model", "longformer", "--shapes", "tiny", "longformer-zh-base",
                                "--seq-length", "1024", "--steps", "5", *OUT), 4,
        ("--model", "longformer", *QUICK_THROUGHPUT), 3),
    "train_throughput_transformer_xl": Section(
        "train_throughput.py", ("--model", "transformer_xl", "--shapes", "tiny", "--seq-length",
                                "512", "--steps", "5", *OUT), 1,
        ("--model", "transformer_xl", *QUICK_THROUGHPUT), 3),
    "train_throughput_longnet": Section(
        "train_throughput.py", ("--model", "longnet", "--shapes", "tiny", "longnet-base",
                                "--seq-length", "2048", "--steps", "5", *OUT), 3,
        ("--model", "longnet", *QUICK_THROUGHPUT), 3),
    "t5_learning": Section("t5_learning.py", OUT, 6, QUICK_WORK, 5),
    "longformer_attention": Section("longformer_attention.py", OUT, 10,
                                    ("--quick", "--threads", "1"), 6),
    "longformer_learning": Section("longformer_learning.py", OUT, 8, QUICK_WORK, 5),
    "longformer_classify": Section("longformer_classify.py",
                                   ("--work-dir", "runs/longformer_learning", *OUT), 21,
                                   QUICK_WORK, 12),
    "transformer_xl_learning": Section("transformer_xl_learning.py", OUT, 55, QUICK_WORK, 7),
    "sparse_attention": Section("sparse_attention.py", OUT, 15, ("--quick", "--threads", "1"), 4),
    "layer_levers": Section("layer_levers.py", OUT, 3, ("--quick",), 4),
    "longnet_attention": Section("longnet_attention.py", ("--threads", "1", *OUT), 21,
                                 ("--quick", "--max-tokens", "256", "--sp-tokens", "256"), 8),
}


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _bar(name: str, expected_s: float, done: threading.Event) -> None:
    """Elapsed against expected time until `done`; it stays below 100% while a run overruns."""
    from tqdm import tqdm
    total = max(1, int(expected_s))
    fmt = ("{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed / " + _clock(expected_s)
           + " expected")
    with tqdm(total=total, desc=name, bar_format=fmt, leave=True, file=sys.stderr,
              disable=None) as bar:  # no bar unless stderr is a terminal
        start = time.monotonic()
        while not done.wait(1.0):
            bar.n = min(int(time.monotonic() - start), total - 1)
            bar.refresh()
        bar.n = total
        bar.refresh()


def _run(cmd: list[str], log) -> tuple[int, float]:
    """Run `cmd` with its output to `log`; (exit code, CPU seconds of it and its children)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C: the child got it too; do not leave it behind
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


# What every quick section imports first; a forkserver imports them once (_preloaded). Only
# installed packages: the server does not have this checkout on its path, and skips silently
# what it cannot import.
PRELOAD = ["torch", "deepspeed", "deepspeed.runtime.engine", "transformers",
           "megatron_lite.training.trainer"]


def _preloaded():
    """A multiprocessing context whose processes fork from a server that imported PRELOAD."""
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _script_in_fork(script: str, args: list[str], log: str, usage: str,
                    cores: list[int] | None) -> None:
    """Run `script` as `python script args` would, in this forked process: output to `log`, then
    this process's and its children's CPU seconds to `usage`."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        os.environ["PYTHONUNBUFFERED"] = "1"
        if cores is not None:
            os.sched_setaffinity(0, cores)
            import torch  # its thread count was sized in the server, before the pinning
            torch.set_num_threads(len(cores))
        os.chdir(ROOT)
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:  # as the interpreter treats it: a message means status 1
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if code == 1 and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        cpu = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))
        with open(usage, "w") as f:
            f.write(f"{cpu}\n")
    sys.exit(code)  # multiprocessing's exit: its finalizers run, then the process ends


def _run_forked(ctx, script: str, args: list[str], log: str,
                cores: list[int] | None) -> tuple[int, float]:
    """`_run` for a quick section, forked from the preloaded server."""
    usage = log + ".cpu"
    proc = ctx.Process(target=_script_in_fork, args=(script, args, log, usage, cores))
    proc.start()
    try:
        proc.join()
    except BaseException:
        proc.kill()
        proc.join()
        raise
    try:
        with open(usage) as f:
            cpu = float(f.read())
        os.remove(usage)
    except (OSError, ValueError):
        cpu = float("nan")
    return proc.exitcode, cpu


def _check_block(name: str, out: str) -> str | None:
    """What is wrong with the block a quick run wrote into `out`, or None."""
    section = SECTIONS[name]
    command = f"- Command: `python benchmarks/{os.path.basename(section.script)}"
    if section.quick[:1] == ("--model",):  # one script, many sections: the block names its model
        command += f" --model {section.quick[1]}"
    try:
        with open(out, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return f"{name}: the quick run wrote no {out}"
    for line in (command, "- Machine: ", "- Versions: torch "):
        if line not in text:
            return (f"{name}: its block in {out} has no `{line.strip()}` line (open it with "
                    "benchmarks/report.py's provenance())")
    return None


# Starts a script with its CPU affinity (and every child's) restricted to the cores given first.
_PINNED = ("import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def run_section(name: str, quick: bool, log_dir: str, progress: bool = True,
                cores: list[int] | None = None, ctx=None) -> tuple[bool, float, float, str]:
    """Run one section, on `cores` only if given, forked from `ctx`'s preloaded server if given
    (quick runs); returns (succeeded, wall seconds, CPU seconds of its processes, log)."""
    section = SECTIONS[name]
    log = os.path.join(log_dir, f"{name}{'_quick' if quick else ''}.log")
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        out = os.path.join(tmp, "BENCHMARKS.md")
        args = ([a.format(tmp=tmp) for a in section.quick] + ["--out", out] if quick
                else list(section.full))
        script = os.path.join("benchmarks", section.script)
        cmd = [sys.executable, script, *args]
        shown = ("$ " + " ".join(cmd) + (f"    (on cores {cores})" if cores else "")
                 + ("    (forked from a preloaded interpreter)" if ctx else "") + "\n")
        if cores is not None:  # its processes see these cores only, and size their threads so
            # (a forked section pins itself)
            cmd = [sys.executable, "-c", _PINNED, ",".join(map(str, cores)), *cmd[1:]]
        done = threading.Event()
        bar = None
        if progress:
            expected = section.quick_seconds if quick else section.minutes * 60
            bar = threading.Thread(target=_bar, args=(name, expected, done), daemon=True)
            bar.start()
        start = time.monotonic()
        with open(log, "w") as f:
            f.write(shown)
            f.flush()
            if ctx is None:
                code, cpu = _run(cmd, f)
            else:
                code, cpu = _run_forked(ctx, os.path.join(ROOT, script), args, log, cores)
                if code != 0:
                    # A fork can fail where a process of its own would not: CI saw a toy script
                    # that prints nothing fail silently when forked, twice (once by a signal, a
                    # native crash after the fork of something the server had started). Run it
                    # again as a process of its own, whose result counts, so that only the
                    # script's own failures fail the section.
                    how = (f"ended by signal {-code}" if code < 0
                           else f"exited with status {code}")
                    f.write(f"\nbenchmarks/run.py: the forked run {how}; running it again in "
                            "a process of its own\n")
                    f.flush()
                    code, cpu = _run(cmd, f)
            problem = _check_block(name, out) if quick and code == 0 else None
            if problem:
                f.write(f"\nbenchmarks/run.py: {problem}\n")
        wall = time.monotonic() - start
        done.set()
        if bar is not None:
            bar.join()
    return code == 0 and problem is None, wall, cpu, log


def tail(path: str, lines: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def select(spec: list[str] | None) -> list[str]:
    if not spec:
        return list(SECTIONS)
    names = [n.strip() for part in spec for n in part.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"benchmarks/run.py: no section {', '.join(unknown)}; the sections are "
                         f"{', '.join(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--section", action="append",
                   help="section(s) to run, comma-separated or repeated (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, BENCHMARKS.md untouched: check that each section runs")
    p.add_argument("--list", action="store_true", help="print the sections and exit")
    p.add_argument("--jobs", type=int, default=None,
                   help="sections run at a time, each on its share of the cores (default 1, "
                        "whose figures nothing disturbs; --quick: one per core, since a quick run "
                        "measures nothing)")
    p.add_argument("--log-dir", default=os.path.join(ROOT, "runs", "bench_logs"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    names = select(args.section)
    cores = sorted(os.sched_getaffinity(0))
    jobs = max(1, min(args.jobs or (len(cores) if args.quick else 1), len(names), len(cores)))
    missing = [f"benchmarks/{SECTIONS[n].script} (section {n})" for n in names
               if not os.path.isfile(os.path.join(ROOT, "benchmarks", SECTIONS[n].script))]
    if missing:
        raise SystemExit(f"benchmarks/run.py: missing script {', '.join(missing)}")

    def expected(n):
        return SECTIONS[n].quick_seconds if args.quick else SECTIONS[n].minutes * 60
    total = sum(map(expected, names)) / min(jobs, len(names))
    print(("quick check of " if args.quick else "")
          + f"{len(names)} section(s); expected time on a quiet 2-core machine (estimates from "
          "recorded runs; a busy machine takes longer):")
    for n in names:
        print(f"  {n:<33} {_clock(expected(n)):>8}")
    print(f"  {'total':<33} {_clock(total):>8}"
          + (f" ({jobs} sections at a time)" if jobs > 1 else ""), flush=True)
    if args.list:
        return 0
    from tqdm import tqdm
    os.makedirs(args.log_dir, exist_ok=True)
    print(f"logs in {args.log_dir}", flush=True)
    results, start = {}, time.monotonic()
    ctx = _preloaded() if args.quick else None

    def report(n, ok, wall, cpu, log):
        results[n] = (ok, wall, cpu)
        message = f"{n}: {'ok' if ok else 'FAILED'} in {_clock(wall)} (log: {log})"
        if not ok:
            message += f"\n--- the end of {log}:\n{tail(log)}---"
        tqdm.write(message, file=sys.stdout)  # above a running bar, not through it
        sys.stdout.flush()

    if jobs == 1:  # one bar per section
        for n in names:
            report(n, *run_section(n, args.quick, args.log_dir, not args.no_progress, ctx=ctx))
    else:  # one bar for them all; each section on its own share of the cores
        free = queue.Queue()
        for i in range(jobs):
            free.put(cores[i::jobs])

        def pinned(n):
            share = free.get()
            try:
                return run_section(n, args.quick, args.log_dir, False, share, ctx)
            finally:
                free.put(share)

        done = threading.Event()
        bar = threading.Thread(target=_bar, args=(f"{len(names)} sections", total, done),
                               daemon=True)
        if not args.no_progress:
            bar.start()
        with ThreadPoolExecutor(jobs) as pool:  # the longest first
            runs = {pool.submit(pinned, n): n for n in sorted(names, key=expected, reverse=True)}
            for future in as_completed(runs):
                report(runs[future], *future.result())
        done.set()
        if bar.is_alive():
            bar.join()
    results = [(n, *results[n]) for n in names]
    print("\n| section | status | wall | CPU s |\n|---|---|---:|---:|")
    for n, ok, wall, cpu in results:
        print(f"| {n} | {'ok' if ok else 'FAILED'} | {_clock(wall)} | {cpu:.0f} |")
    print(f"| total{f' ({jobs} at a time)' if jobs > 1 else ''} | | "
          f"{_clock(time.monotonic() - start)} | {sum(r[3] for r in results):.0f} |", flush=True)
    failed = [n for n, ok, _, _ in results if not ok]
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {args.log_dir})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
