"""Text cleaning for Chinese corpora; every step can be switched off.

Plain NFKC is wrong for Chinese: it folds the full-width punctuation that Chinese text is written
with (`，` -> `,`, `：` -> `:`, `（` -> `(`, `…` -> `...`), changing the text a model learns to
write. So NFKC runs on everything except those characters, and the only full-width forms that fold
are ASCII letters, digits and the ideographic space (U+3000). Half-width CJK forms (`｡` `､`, half-
width katakana) still normalise to their usual full-width forms, as NFKC intends.

Order: control characters -> NFKC -> full-width folding -> traditional-to-simplified -> whitespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import re
import sys
import unicodedata

_FULLWIDTH_LETTERS_DIGITS = (
    [chr(c) for c in range(0xFF10, 0xFF1A)]  # ０-９
    + [chr(c) for c in range(0xFF21, 0xFF3B)]  # Ａ-Ｚ
    + [chr(c) for c in range(0xFF41, 0xFF5B)]  # ａ-ｚ
)
# Full-width punctuation and symbols (！＂＃…～, ｟｠, ￠￡￢￣￤￥￦) and the ellipsis forms that
# Chinese writes as `……`: NFKC would turn every one of them into its ASCII look-alike.
_CJK_PUNCTUATION = (
    [chr(c) for c in range(0xFF01, 0xFF61) if not chr(c).isalnum()]
    + [chr(c) for c in range(0xFFE0, 0xFFE7)]
    + ["\u2026", "\u2025"]
)
_FOLD_TABLE = {ord(ch): ord(ch) - 0xFEE0 for ch in _FULLWIDTH_LETTERS_DIGITS}
_FOLD_TABLE[0x3000] = ord(" ")


def _char_class(chars, group: bool = False) -> re.Pattern:
    cls = "[" + "".join(re.escape(ch) for ch in chars) + "]+"
    return re.compile(f"({cls})" if group else cls)


# Grouped: _nfkc_except splits on them and keeps the runs.
_PROTECT_PUNCT = _char_class(_CJK_PUNCTUATION, group=True)
# When folding is off, NFKC must not fold the full-width letters/digits/space either.
_PROTECT_ALL_FULLWIDTH = _char_class(_CJK_PUNCTUATION + _FULLWIDTH_LETTERS_DIGITS + ["\u3000"],
                                     group=True)

# Tab, newline and carriage return are whitespace, left to the whitespace step. U+FFFD marks bytes
# a converter already lost upstream; keeping it only teaches the model to emit it.
_KEEP_CONTROL = {"\t", "\n", "\r"}


def _nfkc_except(text: str, protect: re.Pattern) -> str:
    if unicodedata.is_normalized("NFKC", text):
        return text
    # With a capturing group, split alternates kept text (even indices) and protected runs (odd);
    # normalising through map keeps the per-segment work in C (a Python loop cost ~2x).
    parts = protect.split(text)
    parts[::2] = map(_NFKC, parts[::2])
    return "".join(parts)


_NFKC = functools.partial(unicodedata.normalize, "NFKC")


_CONTROL = None
_DROP_CATEGORIES = frozenset(("Cc", "Cf"))


def _control_pattern() -> re.Pattern:
    global _CONTROL
    if _CONTROL is None:  # built on first use: it scans every code point (C-level maps, ~0.1 s)
        every = "".join(map(chr, range(sys.maxunicode + 1)))
        chars = [ch for ch in itertools.compress(
            every, map(_DROP_CATEGORIES.__contains__, map(unicodedata.category, every)))
            if ch not in _KEEP_CONTROL]
        _CONTROL = _char_class(chars + ["\ufffd"])
    return _CONTROL


def _drop_control(text: str) -> str:
    # Fast path: every Cc/Cf character is non-printable, so printable text (newlines aside)
    # without U+FFFD has nothing to drop; str.isprintable runs at C speed, the regex ~200 ns/char.
    if "\ufffd" not in text and text.replace("\n", "").isprintable():
        return text
    return _control_pattern().sub("", text)


def _collapse_whitespace(text: str) -> str:
    # Newlines separate paragraphs inside a document (the blank-line reader joins them with
    # "\n"), so a whitespace run containing one becomes a single "\n"; any other run becomes one
    # space; the ends are stripped. str.split() uses the same whitespace as the regex \s, and
    # is ~10x faster than a regex substitution.
    if "\n" not in text:
        return " ".join(text.split())
    return "\n".join(filter(None, [" ".join(line.split()) for line in text.split("\n")]))


_OPENCC = None


def _t2s(text: str) -> str:
    global _OPENCC
    if _OPENCC is None:
        try:
            import opencc
        except ImportError as e:
            raise ImportError(
                "traditional-to-simplified conversion (t2s / --t2s) needs the optional package "
                "opencc: run `pip install opencc` (or `pip install megatron_lite[traditional]`), "
                "or drop the --t2s flag") from e
        try:
            _OPENCC = opencc.OpenCC("t2s.json")
        except Exception:
            _OPENCC = opencc.OpenCC("t2s")  # older releases name the config without .json
    return _OPENCC.convert(text)


def clean_text(text: str, nfkc: bool = True, fold_fullwidth: bool = True, drop_control: bool = True,
               collapse_whitespace: bool = True, t2s: bool = False) -> str:
    """Clean one document. See the module docstring for what each step keeps."""
    if drop_control:
        text = _drop_control(text)
    if nfkc:
        text = _nfkc_except(text, _PROTECT_PUNCT if fold_fullwidth else _PROTECT_ALL_FULLWIDTH)
    # After NFKC (which spares only punctuation here) no full-width letter, digit or U+3000 is
    # left to fold; skipping the translate saves ~90 ns/char.
    if fold_fullwidth and not nfkc and not text.isascii():
        text = text.translate(_FOLD_TABLE)
    if t2s:
        text = _t2s(text)
    if collapse_whitespace:
        text = _collapse_whitespace(text)
    return text


@dataclasses.dataclass(frozen=True)
class CleaningOptions:
    """The switches of `clean_text`, as one picklable object the preprocessing workers receive."""
    nfkc: bool = True
    fold_fullwidth: bool = True
    drop_control: bool = True
    collapse_whitespace: bool = True
    t2s: bool = False
    enabled: bool = True

    def check_available(self) -> None:
        """Fail before any work starts if a requested step needs a package that is missing."""
        if self.enabled and self.t2s:
            _t2s("")

    def __call__(self, text: str) -> str:
        if not self.enabled:
            return text
        return clean_text(text, nfkc=self.nfkc, fold_fullwidth=self.fold_fullwidth,
                          drop_control=self.drop_control,
                          collapse_whitespace=self.collapse_whitespace, t2s=self.t2s)


def add_cleaning_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cleaning (all on by default except --t2s)")
    g.add_argument("--no-clean", action="store_true", help="use the text exactly as read")
    g.add_argument("--no-nfkc", action="store_true", help="skip Unicode NFKC normalisation")
    g.add_argument("--no-fold-fullwidth", action="store_true",
                   help="keep full-width ASCII letters/digits and U+3000 as they are")
    g.add_argument("--no-drop-control", action="store_true", help="keep control characters")
    g.add_argument("--no-collapse-whitespace", action="store_true",
                   help="keep whitespace runs as they are")
    g.add_argument("--t2s", action="store_true",
                   help="convert traditional to simplified Chinese (needs `pip install opencc`)")


def cleaning_options_from_args(args: argparse.Namespace) -> CleaningOptions:
    return CleaningOptions(nfkc=not args.no_nfkc, fold_fullwidth=not args.no_fold_fullwidth,
                           drop_control=not args.no_drop_control,
                           collapse_whitespace=not args.no_collapse_whitespace, t2s=args.t2s,
                           enabled=not args.no_clean)
