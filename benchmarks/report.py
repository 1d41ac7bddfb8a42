"""BENCHMARKS.md sections shared by the benchmark scripts: each script owns one section and
rewrites only the generated block inside it (between its BEGIN and END markers), so hand-written
notes in the section and the other scripts' sections stay as they are."""
from __future__ import annotations

import os

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
