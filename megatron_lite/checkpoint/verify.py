"""Checkpoints you can trust: a manifest of every file, checked on load, and no code run by it.

Every saved tag holds `manifest.json`, written last (after every rank's files, before `latest`
moves): each file's path, size and crc32. `verify_tag` reads the tag back against it, and
unpickles every `.pt` file with `torch.load(weights_only=True)` first, allowing only tensors,
containers and the few DeepSpeed classes its optimizer files hold (`SAFE_GLOBALS`), so a
tampered or foreign pickle is refused by name before DeepSpeed's own loader (which unpickles
with `weights_only=False`) ever opens it. A tag without a manifest (written before manifests)
passes with a warning.

`select_tag` is the trainer's --load: the tag `latest` names if it verifies, else (with
fallback) the newest older tag that does, with the reasons for every one skipped.
"""
from __future__ import annotations

import json
import os
import pickle
import zlib

import torch

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 16 << 20


class CheckpointInvalid(ValueError):
    """A checkpoint tag that fails verification; the message names the file and the reason."""


class _Opaque:
    """Stands in for an allowed DeepSpeed class while scanning (nothing of it is kept or run)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# What DeepSpeed 0.19's ZeRO optimizer files pickle besides tensors and containers, by name (the
# scan maps them onto a stand-in, so neither deepspeed is imported nor its code run).
SAFE_GLOBALS = [(_Opaque, name) for name in (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)]


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(tag_dir: str) -> list[str]:
    """Every file under `tag_dir` but the manifest, as sorted relative paths."""
    out = []
    for root, _, names in os.walk(tag_dir):
        out += [os.path.relpath(os.path.join(root, n), tag_dir) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(tag_dir: str) -> None:
    """List every file of `tag_dir` with its size and crc32 in `manifest.json` (atomically)."""
    files = {rel: {"size": os.path.getsize(os.path.join(tag_dir, rel)),
                   "crc32": _crc32(os.path.join(tag_dir, rel))} for rel in _files(tag_dir)}
    path = os.path.join(tag_dir, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump({"version": MANIFEST_VERSION, "checksum": "crc32", "files": files}, f,
                  indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def scan_pickle(path: str) -> None:
    """Unpickle `path` with weights_only=True and only SAFE_GLOBALS allowed; CheckpointInvalid
    (naming the file) if anything else is in it or it is not a readable torch file."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # weights_only's refusal: code or foreign objects
        # torch's message leads with advice; the line naming the offending global is the fact.
        named = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        raise CheckpointInvalid(f"{path}: refused, it holds objects other than tensors and "
                                f"containers ({named[0] if named else _first_line(e)})") from None
    except Exception as e:  # noqa: BLE001  (any failure to read it safely is a refusal)
        raise CheckpointInvalid(f"{path}: unreadable, truncated or corrupted or not written by "
                                f"torch.save ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def verify_tag(tag_dir: str) -> str | None:
    """Check `tag_dir` against its manifest and scan its pickles. Returns a warning when it has
    no manifest (an older checkpoint), None when it verifies; raises CheckpointInvalid."""
    if not os.path.isdir(tag_dir):
        raise CheckpointInvalid(f"{tag_dir} does not exist")
    manifest_path = os.path.join(tag_dir, MANIFEST)
    warning = None
    if not os.path.isfile(manifest_path):
        warning = (f"{tag_dir} has no {MANIFEST} (saved before checkpoints carried one): its "
                   f"files cannot be checked for truncation or corruption")
    else:
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
            listed = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointInvalid(f"{manifest_path} is unreadable ({e})") from None
        for rel, want in sorted(listed.items()):
            path = os.path.join(tag_dir, rel)
            if not os.path.isfile(path):
                raise CheckpointInvalid(f"{path} is missing (listed in {MANIFEST})")
            size = os.path.getsize(path)
            if size != want["size"]:
                raise CheckpointInvalid(f"{path} has {size} bytes, {MANIFEST} says "
                                        f"{want['size']} (truncated or overwritten)")
            if _crc32(path) != want["crc32"]:
                raise CheckpointInvalid(f"{path} does not match its crc32 in {MANIFEST} "
                                        f"(corrupted)")
    for rel in _files(tag_dir):
        if rel.endswith(".pt"):
            scan_pickle(os.path.join(tag_dir, rel))
    return warning


def select_tag(load_dir: str, latest_tag: str, older_tags: list[str], *,
               fallback: bool = True) -> tuple[str, list[str]]:
    """(the tag to load, notes for the log): `latest_tag` if it verifies, else with `fallback`
    the first of `older_tags` (newest first) that does. Raises CheckpointInvalid when none does,
    or at once without fallback."""
    notes, skipped = [], []
    for tag in [latest_tag] + [t for t in older_tags if t != latest_tag]:
        try:
            warning = verify_tag(os.path.join(load_dir, tag))
        except CheckpointInvalid as e:
            if not fallback:
                raise CheckpointInvalid(f"{e}; without --no-load-fallback the newest older "
                                        f"checkpoint that verifies would load instead") from None
            skipped.append(f"skipped {tag}: {e}")
            continue
        if warning:
            notes.append(warning)
        return tag, skipped + notes + ([f"loading {tag} instead of {latest_tag}, the newest "
                                        f"checkpoint that verifies"] if skipped else [])
    raise CheckpointInvalid(f"no checkpoint in {load_dir} verifies: " + "; ".join(skipped))
