"""BENCHMARKS.md sections shared by the benchmark scripts: each script owns one section and
rewrites only the generated block inside it (between its BEGIN and END markers), so hand-written
notes in the section and the other scripts' sections stay as they are. Every block opens with the
same provenance lines (`provenance`): the command, the date, the machine and the versions."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import shlex
import sys

HEADER = ("# Benchmarks\n\nMeasured results of the scripts in `benchmarks/`; each section says "
          "how to reproduce its figures.\n")


def update_section(path: str, section: str, begin: str, end: str, block: str) -> None:
    """Put `block` between `begin` and `end` in `section` of `path` (created if missing); the
    generated block goes at the end of the section, after any hand-written text. The file is
    replaced atomically."""
    generated = f"{begin}\n{block}\n{end}"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        text = HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + generated + rest.split(end, 1)[1]
    elif section in text:
        head, rest = text.split(section, 1)
        cut = rest.find("\n## ")
        body, tail = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
        text = head + section + body.rstrip("\n") + "\n\n" + generated + "\n" + tail
    else:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{generated}\n"
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark, in bytes.

    On Linux it is VmHWM of /proc/self/status: the peak of the process's own memory. Not
    `getrusage().ru_maxrss`, which Linux carries across fork and exec. A probe started from a
    parent then reports at least the parent's peak (the parent's 6.6 GiB instead of a probe's
    3.7 GiB in a sparse-attention run)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_line(threads: int | None = None) -> str:
    """CPU model (/proc/cpuinfo), cores, memory and, when given, the torch threads used."""
    from megatron_lite.training.mfu import cpu_model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    line = f"{cpu_model()}, {os.cpu_count()} cores ({cores} usable), {memory:.0f} GiB"
    return line + ("" if threads is None else
                   f"; {threads} torch thread{'s' if threads != 1 else ''}")


def versions_line() -> str:
    return (f"torch {_version('torch')}, DeepSpeed {_version('deepspeed')}, transformers "
            f"{_version('transformers')}, Python {platform.python_version()}")


def provenance(script: str, argv: list[str], started: datetime.datetime, *,
               load_start: float | None = None, threads: int | None = None,
               note: str = "") -> list[str]:
    """The lines every generated block opens with: the command that regenerates it (`script` is
    the benchmark's __file__, `argv` its arguments), the UTC start time, the machine (CPU model,
    cores, memory, torch threads), the 1-minute load average at the start (`load_start`, when
    the script took it) and now, and the versions of torch, DeepSpeed and transformers. `note`
    follows the load average (what the load means for this benchmark's figures)."""
    command = shlex.join(["python", f"benchmarks/{os.path.basename(script)}", *argv])
    now = os.getloadavg()[0]
    load = (f"{load_start:.2f} / {now:.2f}" if load_start is not None else f"{now:.2f}")
    return [
        f"- Command: `{command}`",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine_line(threads)}",
        f"- Load average (1 min) {'at start / end' if load_start is not None else 'at the end'}: "
        f"{load}" + (f". {note}" if note else ""),
        f"- Versions: {versions_line()}",
    ]


def allocator_line(kept: bool, where: str = "") -> str:
    """The block's *Allocator* line: whether the run kept freed memory in glibc's malloc, as
    the trainer sets it up on CPU (`keep_freed_memory`'s result is `kept`); `where` says which
    processes ran so (", in the timing process and each memory probe")."""
    return "- Allocator: glibc malloc " + (
        "keeping freed memory for reuse, as the trainer sets it up on CPU "
        f"(`megatron_lite.parallel.launch.keep_freed_memory`){where}" if kept else
        "with its defaults (MEGATRON_LITE_KEEP_FREED_MEMORY=0, a MALLOC_* variable or another "
        "allocator: the trainer would leave it so too)")
