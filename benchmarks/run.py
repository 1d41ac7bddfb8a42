"""Regenerate BENCHMARKS.md: every section's benchmark in one command, or the ones named.

    python benchmarks/run.py                              # every section (make bench)
    python benchmarks/run.py --section reshard,t5_learning   # some (make bench SECTION=reshard)
    python benchmarks/run.py --quick                      # each on tiny shapes (make bench-quick)
    python benchmarks/run.py --list                       # the sections and their durations

Each section is one script of this directory run as a child process with the arguments its
BENCHMARKS.md block names as its command; its output goes to a log file (printed), and a bar
shows the elapsed time against the section's expected duration. The durations are estimates from
the recorded runs on the 2-core VM these figures come from, quiet; a shared machine takes longer.
`--quick` runs each script on tiny shapes and writes nothing into BENCHMARKS.md: it only checks
that every benchmark still runs end to end, and fails naming the sections that did not.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Section:
    script: str
    full: tuple[str, ...]
    minutes: float
    """Expected duration of the full run on a quiet 2-core machine."""
    quick: tuple[str, ...] | None
    """Arguments of the quick check ({tmp} is a scratch directory); None: no quick mode yet (the
    learning benchmarks' --train-iters must stay above their configs' warmup, so a tiny run
    needs its own flags)."""


OUT = ("--out", "BENCHMARKS.md")
SECTIONS = {
    "data_pipeline": Section("data_pipeline.py", OUT, 11,
                             ("--corpus-docs", "300", "--repeats", "1", "--rounds", "1",
                              "--workers", "1", "--work-dir", "{tmp}")),
    "train_throughput": Section(
        "train_throughput.py", ("--shapes", "tiny", "linglong-106m", "--seq-length", "1024",
                                "--micro-batch-size", "1", "--warmup", "1", "--steps", "5", *OUT),
        12, ("--shapes", "tiny", "--seq-length", "64", "--warmup", "0", "--steps", "1")),
    "reshard": Section("reshard.py", OUT, 2,
                       ("--config", "configs/gpt/tiny.yaml", "--vocab-size", "1000",
                        "--targets", "1")),
    "train_throughput_t5": Section(
        "train_throughput_t5.py", ("--steps", "7", "--threads", "1", *OUT), 12,
        ("--shapes", "tiny", "--seq-length", "64", "--decoder-seq-length", "16", "--warmup", "0",
         "--steps", "1")),
    "t5_learning": Section("t5_learning.py", OUT, 6, None),
    "longformer_attention": Section("longformer_attention.py", OUT, 10, ("--quick",)),
    "longformer_learning": Section("longformer_learning.py", OUT, 8, None),
    "longformer_classify": Section("longformer_classify.py",
                                   ("--work-dir", "runs/longformer_learning", *OUT), 30, None),
    "transformer_xl_learning": Section("transformer_xl_learning.py", OUT, 45, None),
    "sparse_attention": Section("sparse_attention.py", OUT, 15, ("--quick",)),
    "longnet_attention": Section("longnet_attention.py", ("--threads", "1", *OUT), 21,
                                 ("--quick",)),
}


def _bar(name: str, expected_s: float, done: threading.Event) -> None:
    """A bar of elapsed / expected seconds until `done` (it stops at 99% if the run is slow)."""
    from tqdm import tqdm
    total = max(1, int(expected_s))
    with tqdm(total=total, desc=f"{name} (elapsed/expected s)", unit="s", leave=True,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total}") as bar:
        start = time.monotonic()
        while not done.wait(1.0):
            bar.n = min(int(time.monotonic() - start), total - 1)
            bar.refresh()
        bar.n = total
        bar.refresh()


def run_section(name: str, quick: bool, log_dir: str, progress: bool = True) -> tuple[bool, float,
                                                                                      str]:
    """Run one section; returns (succeeded, wall seconds, log path)."""
    section = SECTIONS[name]
    log = os.path.join(log_dir, f"{name}{'_quick' if quick else ''}.log")
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        args = [a.format(tmp=tmp) for a in (section.quick if quick else section.full)]
        cmd = [sys.executable, os.path.join("benchmarks", section.script), *args]
        done = threading.Event()
        bar = None
        if progress:
            bar = threading.Thread(target=_bar, args=(name, 60 if quick else section.minutes * 60,
                                                      done), daemon=True)
            bar.start()
        start = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        wall = time.monotonic() - start
        done.set()
        if bar is not None:
            bar.join()
    return code == 0, wall, log


def tail(path: str, lines: int = 15) -> str:
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
                   help="tiny shapes, nothing written to BENCHMARKS.md: check that each runs")
    p.add_argument("--list", action="store_true", help="print the sections and exit")
    p.add_argument("--log-dir", default=os.path.join(ROOT, "runs", "bench_logs"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    names = select(args.section)
    if args.quick:
        skipped = [n for n in names if SECTIONS[n].quick is None]
        names = [n for n in names if SECTIONS[n].quick is not None]
        if skipped:
            print(f"no quick mode yet, not checked: {', '.join(skipped)}")
    total = sum(SECTIONS[n].minutes for n in names)
    print(("quick check of " if args.quick else "")
          + f"{len(names)} section(s); expected minutes on a quiet 2-core machine:")
    for n in names:
        print(f"  {n:<26} {'~1' if args.quick else SECTIONS[n].minutes:>4}")
    if not args.quick:
        print(f"  {'total':<26} {total:>4g}")
    if args.list:
        return 0
    os.makedirs(args.log_dir, exist_ok=True)
    results = []
    for n in names:
        ok, wall, log = run_section(n, args.quick, args.log_dir, not args.no_progress)
        results.append((n, ok, wall, log))
        print(f"{n}: {'ok' if ok else 'FAILED'} in {wall:.0f} s (log: {log})", flush=True)
        if not ok:
            print(tail(log), flush=True)
    print("\n| section | status | wall s |\n|---|---|---:|")
    for n, ok, wall, _ in results:
        print(f"| {n} | {'ok' if ok else 'FAILED'} | {wall:.0f} |")
    failed = [n for n, ok, _, _ in results if not ok]
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {args.log_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
