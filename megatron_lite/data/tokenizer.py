"""One tokenizer interface over sentencepiece models and character vocabularies.

A saved tokenizer is a directory: the vocabulary file (`spiece.model` or `vocab.txt`) and
`tokenizer.json` (kind, special tokens, sentinel layout). Its `hash` is a sha256 over those files'
canonical bytes, so it survives save/load; every dataset and checkpoint records it and
`check_tokenizer_hash` turns a mismatch into an error instead of a silent garbage run.

`encode` never adds special tokens and never parses special-token strings out of the text (the
sentencepiece model matches its user-defined symbols, such as `<extra_id_3>`, itself): objectives
insert special ids explicitly.

Sentencepiece models trained by tools/train_tokenizer.py have fixed ids: pad=0, eos=1 (`</s>`,
also the end-of-document id), unk=2, bos=3, then the T5 sentinels `<extra_id_0>`..`<extra_id_99>`
at 4..103 as user-defined symbols, then "\\n" as a user-defined symbol so paragraph breaks survive.
A Hugging Face T5 `spiece.model` has no sentinels in the model; they are appended above it as HF
does (`<extra_id_0>` is the top id), so an imported model keeps its own ids.

Character vocabularies (`vocab.txt`, one token per line) give every character its own token, CJK
or not, so encode/decode is exact for text inside the vocabulary. A whitespace or non-printable
token is written in vocab.txt as `\\uXXXX` or `\\UXXXXXXXX` (e.g. `\\u000a` for a newline), since a
bare newline or space cannot be a line. `##x` continuation forms may exist in a loaded BERT
vocab.txt; `encode` never emits them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

TOKENIZER_JSON = "tokenizer.json"
SP_MODEL_FILE = "spiece.model"
VOCAB_FILE = "vocab.txt"
FORMAT = "megatron_lite.tokenizer/1"

ROLES = ("pad", "unk", "eos", "bos", "eod", "cls", "sep", "mask")
# Presets: (special tokens in vocabulary order, role -> token).
PRESETS = {
    # Longformer_ZH / BERT-Chinese. A document ends with [SEP], as BERT packs segments.
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
             {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]",
              "eos": "[SEP]", "bos": "[CLS]", "eod": "[SEP]"}),
    # LingLong.
    "linglong": (["<pad>", "<unk>", "<|endoftext|>", "<sep>", "<|startoftext|>"],
                 {"pad": "<pad>", "unk": "<unk>", "eod": "<|endoftext|>", "eos": "<|endoftext|>",
                  "sep": "<sep>", "bos": "<|startoftext|>"}),
}
DEFAULT_SENTINELS = {"bert": 0, "linglong": 100}
SP_SENTINELS = 100


def sentinel_token(k: int) -> str:
    return f"<extra_id_{k}>"


class TokenizerError(ValueError):
    """A tokenizer that is missing, malformed, or does not match the data it is used with."""


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Tokenizer:
    """The interface every tokenizer implements; see the module docstring."""
    kind: str = ""
    is_char_level: bool = False

    # -- to implement --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _special_token_ids(self) -> dict[str, int | None]:
        raise NotImplementedError

    def _sentinel_ids(self) -> list[int]:
        raise NotImplementedError

    def _files(self) -> dict[str, bytes]:
        """The saved files' canonical bytes: what `save` writes and `hash` digests."""
        raise NotImplementedError

    def _surface(self, i: int) -> str:
        """The text id `i` spells inside decoded text (for `char_lengths`)."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def _role(self, role: str) -> int | None:
        if not hasattr(self, "_roles_cache"):
            self._roles_cache = self._special_token_ids()
        return self._roles_cache.get(role)

    pad_id = property(lambda self: self._role("pad"))
    unk_id = property(lambda self: self._role("unk"))
    eos_id = property(lambda self: self._role("eos"))
    bos_id = property(lambda self: self._role("bos"))
    eod_id = property(lambda self: self._role("eod"))
    cls_id = property(lambda self: self._role("cls"))
    sep_id = property(lambda self: self._role("sep"))
    mask_id = property(lambda self: self._role("mask"))

    @property
    def num_sentinels(self) -> int:
        return len(self._sentinel_ids())

    def sentinel_id(self, k: int) -> int:
        ids = self._sentinel_ids()
        if not 0 <= k < len(ids):
            raise ValueError(f"sentinel <extra_id_{k}> requested, but this {self.kind} tokenizer "
                             f"has {len(ids)} sentinels (<extra_id_0>..<extra_id_{len(ids) - 1}>); "
                             f"train one with more (--num-sentinels) or use fewer spans")
        return ids[k]

    def char_lengths(self) -> np.ndarray:
        """Characters each id spells in decoded text: the denominator of bits per character.

        Special tokens and sentinels spell none; the unknown token stands for one character it
        replaced; a sentencepiece piece counts its word-boundary mark as the space it decodes to,
        and a byte-fallback piece (a fraction of a character; rare in a trained vocabulary) none."""
        if not hasattr(self, "_char_lengths"):
            silent = self.special_ids() - {self.unk_id}
            self._char_lengths = np.array(
                [0 if i in silent else 1 if i == self.unk_id else len(self._surface(i))
                 for i in range(self.vocab_size)], dtype=np.int64)
        return self._char_lengths

    def special_ids(self) -> set[int]:
        ids = {i for i in self._special_token_ids().values() if i is not None}
        return ids | set(self._sentinel_ids())

    @property
    def hash(self) -> str:
        if not hasattr(self, "_hash_cache"):
            h = hashlib.sha256()
            for name, data in sorted(self._files().items()):
                h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
            self._hash_cache = h.hexdigest()
        return self._hash_cache

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for name, data in self._files().items():
            _atomic_write(os.path.join(directory, name), data)

    def _meta_bytes(self, meta: dict) -> bytes:
        meta = {"format": FORMAT, "kind": self.kind, **meta}
        return (json.dumps(meta, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, hash={self.hash[:12]})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    is_char_level = False

    def __init__(self, model_proto: bytes, num_extra_ids: int = 0, source: str = "<memory>"):
        """`num_extra_ids` > 0 appends that many HF-style sentinels above the model's pieces."""
        import sentencepiece as spm
        self._proto = bytes(model_proto)
        self.source = source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            raise TokenizerError(f"{source}: not a valid sentencepiece model ({e}); retrain it "
                                 f"with tools/train_tokenizer.py --type sentencepiece") from e
        self._n = self.sp.get_piece_size()
        in_model = []
        while True:
            i = self.sp.piece_to_id(sentinel_token(len(in_model)))
            if i == self.sp.unk_id() or i >= self._n:
                break
            in_model.append(i)
        if in_model and num_extra_ids:
            raise TokenizerError(f"{source}: the model already has {len(in_model)} sentinels; do "
                                 f"not append {num_extra_ids} more (num_extra_ids=0)")
        self.num_extra_ids = num_extra_ids
        self._sentinels = in_model or [self._n + num_extra_ids - 1 - k
                                       for k in range(num_extra_ids)]
        # Ids decode renders as their token string (pad is skipped) rather than through
        # sentencepiece, which drops control symbols and cannot see appended sentinels.
        self._visible = {i for i in range(self._n)
                         if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._visible |= set(self._sentinels)

    @classmethod
    def from_file(cls, path: str, num_extra_ids: int = 0) -> "SentencePieceTokenizer":
        with open(path, "rb") as f:
            return cls(f.read(), num_extra_ids=num_extra_ids, source=path)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        pad = self.pad_id
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i in self._visible:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if i != pad:
                    out.append(self.id_to_token(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return self._n + self.num_extra_ids

    def id_to_token(self, i: int) -> str:
        if self._n <= i < self.vocab_size:
            return sentinel_token(self._n + self.num_extra_ids - 1 - i)
        return self.sp.id_to_piece(int(i))

    def token_to_id(self, token: str) -> int | None:
        m = re.fullmatch(r"<extra_id_(\d+)>", token)
        if m and self.num_extra_ids and int(m.group(1)) < self.num_extra_ids:
            return self._sentinels[int(m.group(1))]
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
            return None
        return i

    def _surface(self, i: int) -> str:
        if i >= self._n or self.sp.is_control(i) or self.sp.is_unknown(i):
            return self.id_to_token(i)
        if self.sp.is_byte(i):
            return ""  # a UTF-8 byte of a character spelled by several byte pieces
        return self.sp.id_to_piece(i).replace("\u2581", " ")

    def _special_token_ids(self) -> dict[str, int | None]:
        def get(i):
            return i if i >= 0 else None
        eos = get(self.sp.eos_id())
        return {"pad": get(self.sp.pad_id()), "unk": get(self.sp.unk_id()), "eos": eos,
                "bos": get(self.sp.bos_id()), "eod": eos}

    def _sentinel_ids(self) -> list[int]:
        return self._sentinels

    def _files(self) -> dict[str, bytes]:
        meta = {"model_file": SP_MODEL_FILE, "num_extra_ids": self.num_extra_ids,
                "special_tokens": {r: self.id_to_token(i)
                                   for r, i in self._special_token_ids().items() if i is not None},
                "num_sentinels": self.num_sentinels}
        return {SP_MODEL_FILE: self._proto, TOKENIZER_JSON: self._meta_bytes(meta)}


_ESCAPED = re.compile(r"\\u([0-9a-f]{4})|\\U([0-9a-f]{8})")


def _needs_escape(ch: str) -> bool:
    return ch.isspace() or not ch.isprintable()


def _vocab_line(token: str) -> str:
    if len(token) == 1 and _needs_escape(token):
        c = ord(token)
        return f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}"
    return token


def _parse_vocab_line(line: str) -> str:
    m = _ESCAPED.fullmatch(line)
    if m:
        ch = chr(int(m.group(1) or m.group(2), 16))
        if _needs_escape(ch):  # a printable token that merely looks escaped stays as written
            return ch
    return line


class CharTokenizer(Tokenizer):
    kind = "char"
    is_char_level = True

    def __init__(self, tokens: Sequence[str], special_tokens: dict[str, str],
                 num_sentinels: int = 0, preset: str | None = None, source: str = "<memory>"):
        """`tokens` is the whole vocabulary in id order; `special_tokens` maps roles (pad, unk,
        eod required; eos defaults to eod; bos, cls, sep, mask optional) to tokens in it; the
        sentinels `<extra_id_0>`..`<extra_id_{num_sentinels-1}>` must be in it too."""
        self.tokens = list(tokens)
        self.source = source
        self.preset = preset
        self.vocab: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            if t in self.vocab:
                raise TokenizerError(f"{source}: token {t!r} appears twice (ids {self.vocab[t]} "
                                     f"and {i}); remove the duplicate line")
            if t == "":
                raise TokenizerError(f"{source}: empty token at id {i} (line {i + 1}); remove it")
            self.vocab[t] = i
        unknown_roles = set(special_tokens) - set(ROLES)
        if unknown_roles:
            raise TokenizerError(f"unknown special-token roles {sorted(unknown_roles)}; valid "
                                 f"roles are {list(ROLES)}")
        special_tokens = dict(special_tokens)
        special_tokens.setdefault("eos", special_tokens.get("eod"))
        for role in ("pad", "unk", "eod"):
            if not special_tokens.get(role):
                raise TokenizerError(f"a character tokenizer needs a {role!r} special token; use a "
                                     f"preset ({', '.join(PRESETS)}) or pass {role}=TOKEN")
        self.special_tokens = {r: t for r, t in special_tokens.items() if t is not None}
        for role, tok in self.special_tokens.items():
            if tok not in self.vocab:
                raise TokenizerError(f"{source}: special token {tok!r} ({role}) is not in the "
                                     f"vocabulary; add it as a line of vocab.txt or pick another "
                                     f"preset")
        self._sentinels = []
        for k in range(num_sentinels):
            if sentinel_token(k) not in self.vocab:
                raise TokenizerError(f"{source}: sentinel {sentinel_token(k)} is not in the "
                                     f"vocabulary, which should hold {num_sentinels}")
            self._sentinels.append(self.vocab[sentinel_token(k)])
        self._unk = self.vocab[self.special_tokens["unk"]]
        self._pad = self.vocab[self.special_tokens["pad"]]

    # -- construction --------------------------------------------------------------------------
    @staticmethod
    def _resolve_specials(preset: str | None, special_tokens: dict[str, str] | None):
        if preset is not None and preset not in PRESETS:
            raise TokenizerError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        order, roles = PRESETS[preset] if preset else ([], {})
        roles = {**roles, **(special_tokens or {})}
        order = list(order) + [t for t in roles.values() if t and t not in order]
        return order, roles

    @classmethod
    def train(cls, texts: Iterable[str], preset: str | None = "linglong",
              special_tokens: dict[str, str] | None = None, num_sentinels: int | None = None,
              min_count: int = 1, max_vocab: int | None = None) -> "CharTokenizer":
        """Count characters; vocabulary = specials, sentinels, then characters by descending
        count (ties by code point, so the same corpus always gives the same ids)."""
        import collections
        counts: collections.Counter = collections.Counter()
        for text in texts:
            counts.update(text)
        order, roles = cls._resolve_specials(preset, special_tokens)
        if num_sentinels is None:
            num_sentinels = DEFAULT_SENTINELS.get(preset, 0)
        head = order + [sentinel_token(k) for k in range(num_sentinels)]
        chars = sorted((c for c, n in counts.items() if n >= min_count and c not in head),
                       key=lambda c: (-counts[c], ord(c)))
        if max_vocab is not None:
            if max_vocab <= len(head):
                raise TokenizerError(f"vocab size {max_vocab} leaves no room for characters after "
                                     f"{len(head)} special tokens and sentinels")
            chars = chars[:max_vocab - len(head)]
        if not chars:
            raise TokenizerError(f"no character occurs at least {min_count} times in the corpus; "
                                 f"lower --min-count or give more text")
        return cls(head + chars, roles, num_sentinels, preset=preset)

    @classmethod
    def from_vocab_file(cls, path: str, preset: str | None = None,
                        special_tokens: dict[str, str] | None = None,
                        num_sentinels: int | None = None) -> "CharTokenizer":
        """Load a vocab.txt (e.g. BERT-Chinese's). Missing sentinels are appended at the end."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read the vocabulary ({e}); it must be a UTF-8 "
                                 f"file with one token per line") from e
        if lines and lines[-1] == "":
            lines.pop()
        tokens = []
        for n, line in enumerate(lines, start=1):
            line = line.rstrip("\r")
            if line == "":
                raise TokenizerError(f"{path}:{n}: empty line; a vocab.txt holds one token per "
                                     f"line (write whitespace tokens as \\u0020 etc.)")
            tokens.append(_parse_vocab_line(line))
        if preset is None and not special_tokens:
            preset = next((p for p, (order, _) in PRESETS.items()
                           if all(t in tokens for t in order)), None)
            if preset is None:
                raise TokenizerError(f"{path}: cannot tell the special tokens; pass --preset "
                                     f"{'|'.join(PRESETS)} or the tokens themselves")
        _, roles = cls._resolve_specials(preset, special_tokens)
        if num_sentinels is None:
            num_sentinels = DEFAULT_SENTINELS.get(preset, 0)
        present = set(tokens)
        tokens += [sentinel_token(k) for k in range(num_sentinels)
                   if sentinel_token(k) not in present]
        return cls(tokens, roles, num_sentinels, preset=preset, source=path)

    # -- interface -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(map(self.vocab.get, text, itertools.repeat(self._unk, len(text))))

    def encode_array(self, text: str, dtype=np.int64) -> np.ndarray:
        """`encode(text)` as an array, ~20x faster: the text's code points (its UTF-32 bytes)
        index a code point -> id table. Only one-character tokens can match a character."""
        lut = getattr(self, "_lut", None)
        if lut is None or lut.dtype != dtype:
            lut = np.full(0x110000, self._unk, dtype=dtype)
            for t, i in self.vocab.items():
                if len(t) == 1:
                    lut[ord(t)] = i
            self._lut = lut
        # surrogatepass: a lone surrogate (from a JSON escape) is a code point like any other.
        return lut[np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} is outside the vocabulary "
                                 f"(size {len(self.tokens)})")
            if i == self._pad:
                continue
            t = self.tokens[i]
            out.append(t[2:] if t.startswith("##") and len(t) > 2 else t)
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def id_to_token(self, i: int) -> str:
        return self.tokens[int(i)]

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def _surface(self, i: int) -> str:
        t = self.tokens[i]
        return t[2:] if t.startswith("##") and len(t) > 2 else t

    def _special_token_ids(self) -> dict[str, int | None]:
        return {r: self.vocab[t] for r, t in self.special_tokens.items()}

    def _sentinel_ids(self) -> list[int]:
        return self._sentinels

    def _files(self) -> dict[str, bytes]:
        vocab = "".join(_vocab_line(t) + "\n" for t in self.tokens).encode()
        meta = {"vocab_file": VOCAB_FILE, "special_tokens": self.special_tokens,
                "num_sentinels": self.num_sentinels, "preset": self.preset}
        return {VOCAB_FILE: vocab, TOKENIZER_JSON: self._meta_bytes(meta)}


def _load_hf_extra_ids(directory: str) -> int | None:
    cfg = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            extra = json.load(f).get("extra_ids")
        if extra is not None:
            return int(extra)
    return None


def _load_bare_sentencepiece(path: str) -> SentencePieceTokenizer:
    """A model without our tokenizer.json: T5 convention, 100 sentinels appended unless the model
    has its own or the HF tokenizer_config.json says otherwise."""
    tok = SentencePieceTokenizer.from_file(path)
    if tok.num_sentinels:
        return tok
    extra = _load_hf_extra_ids(os.path.dirname(path))
    return SentencePieceTokenizer.from_file(path, SP_SENTINELS if extra is None else extra)


def load_tokenizer(path: str) -> Tokenizer:
    """Load a saved tokenizer directory (or its tokenizer.json), a bare sentencepiece `.model`,
    a bare `vocab.txt`, or a Hugging Face directory holding `spiece.model` / `vocab.txt`."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) == TOKENIZER_JSON:
        path = os.path.dirname(path) or "."
    if os.path.isdir(path):
        meta_path = os.path.join(path, TOKENIZER_JSON)
        if os.path.isfile(meta_path):
            return _load_saved(path, meta_path)
        for name in (SP_MODEL_FILE, "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return _load_bare_sentencepiece(os.path.join(path, name))
        if os.path.isfile(os.path.join(path, VOCAB_FILE)):
            return CharTokenizer.from_vocab_file(os.path.join(path, VOCAB_FILE))
        raise TokenizerError(f"{path}: no {TOKENIZER_JSON}, {SP_MODEL_FILE} or {VOCAB_FILE} here; "
                             f"train a tokenizer with tools/train_tokenizer.py --output-dir {path}")
    if os.path.isfile(path):
        if path.endswith(".model"):
            return _load_bare_sentencepiece(path)
        return CharTokenizer.from_vocab_file(path)
    raise TokenizerError(f"{path}: no such tokenizer file or directory; train one with "
                         f"tools/train_tokenizer.py or pass the right --tokenizer")


def _load_saved(directory: str, meta_path: str) -> Tokenizer:
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        kind = meta["kind"]
        if kind == "sentencepiece":
            return SentencePieceTokenizer.from_file(os.path.join(directory, meta["model_file"]),
                                                    num_extra_ids=int(meta["num_extra_ids"]))
        if kind == "char":
            tok = CharTokenizer.from_vocab_file(os.path.join(directory, meta["vocab_file"]),
                                                preset=meta.get("preset"),
                                                special_tokens=meta["special_tokens"],
                                                num_sentinels=int(meta["num_sentinels"]))
            return tok
    except (KeyError, ValueError, TypeError) as e:
        if isinstance(e, TokenizerError):
            raise
        raise TokenizerError(f"{meta_path}: malformed tokenizer metadata "
                             f"({type(e).__name__}: {e}); save the tokenizer again with "
                             f"tools/train_tokenizer.py") from e
    raise TokenizerError(f"{meta_path}: unknown tokenizer kind {kind!r}; expected 'sentencepiece' "
                         f"or 'char'")


def check_tokenizer_hash(expected: str, tokenizer: Tokenizer, what: str) -> None:
    """Raise if `what` (a dataset or checkpoint path) was made with a different tokenizer."""
    if expected != tokenizer.hash:
        raise TokenizerError(
            f"{what} was made with tokenizer {expected} but the tokenizer given "
            f"({getattr(tokenizer, 'source', '?')}) has hash {tokenizer.hash}; pass the tokenizer "
            f"it was made with, or rebuild it with tools/preprocess_data.py and this tokenizer")
