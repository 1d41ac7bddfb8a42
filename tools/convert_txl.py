#!/usr/bin/env python
"""Import Chinese-Transformer-XL's released checkpoint (the 2.9B "文汇" weights) as ours.

    # txl-2.9B/mp_rank_00_model_states.pt (no `latest`) and its sentencepiece model
    python tools/convert_txl.py txl-2.9B runs/txl-2.9b \
        --tokenizer Chinese-Transformer-XL/chinese_sentencepiece/cog-pretrain.model \
        --tensor-model-parallel-size 2
    deepspeed --num_gpus 2 generate.py --load runs/txl-2.9b --prompt "问题：..."
    bash scripts/ds_finetune_txl.sh runs/txl-2.9b data.jsonl

The release is one model-parallel shard (`mp_rank_00_model_states.pt`, GPT2Model's parameter
names under `module`, its fused q/k/v rows as [q; k; v]); the weights map onto
`models/transformer_xl.py` ("Chinese-Transformer-XL's released checkpoint"). The file is
unpickled with `weights_only=True` and an explicit allowlist of the non-tensor entries DeepSpeed
and their trainer pickle (numpy's RNG state arrays): nothing else in it can run. Their vocabulary
is the sentencepiece model's 50000 pieces plus `<|endoftext|>` = 50000 (end of document, also
their padding); the tokenizer written beside our checkpoint is that model with the piece appended.
What the weights do not say comes from flags: --mem-length (256) and --max-position-embeddings
(768: their segment of 512 plus the memory). The output is our checkpoint (weights only, tag
global_step0) at any tensor-parallel size: fine-tune it with --load OUT --finetune.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_lite.checkpoint.checkpointing import write_weights_only_checkpoint  # noqa: E402
from megatron_lite.checkpoint.metadata import CheckpointMeta  # noqa: E402
from megatron_lite.checkpoint.reshard import ReshardError, shard_state_dict  # noqa: E402
from megatron_lite.data.tokenizer import SentencePieceTokenizer, TokenizerError  # noqa: E402
from megatron_lite.models.registry import ConversionError, get_model_spec  # noqa: E402
from megatron_lite.models.transformer_xl import (released_config,  # noqa: E402
                                                 state_from_released)

RELEASED_FILE = "mp_rank_00_model_states.pt"
END_OF_TEXT = "<|endoftext|>"

# What their file pickles besides tensors and plain containers: numpy's RNG state
# (np.random.get_state(): a uint32 array), under numpy 1.x names (the release's) and 2.x names.
_reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
SAFE_GLOBALS = [(_reconstruct, "numpy.core.multiarray._reconstruct"), _reconstruct, np.ndarray,
                np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]


def released_file(path: str) -> str:
    """The release's model-state file: `path` itself, or the one file in the directory."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such file or directory; give the directory holding "
                              f"{RELEASED_FILE} (or the file)")
    shards = sorted(f for f in os.listdir(path) if f.startswith("mp_rank_"))
    if RELEASED_FILE not in shards:
        raise ConversionError(f"{path} holds no {RELEASED_FILE}; give the directory of the "
                              f"released checkpoint")
    if len(shards) > 1:
        raise ConversionError(f"{path} holds {len(shards)} model-parallel shards; this reads the "
                              f"single-file release ({RELEASED_FILE}) only")
    return os.path.join(path, RELEASED_FILE)


def read_released(path: str) -> dict:
    """Their `module` state dict, unpickled through the allowlist (never weights_only=False)."""
    def load(mmap: bool):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:  # memory-mapped, so the 2.9B weights are not held twice while converting
            checkpoint = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            checkpoint = load(mmap=False)  # a file in torch's legacy (pre-zip) format
    except Exception as e:  # the unpickler names what it refused
        refused = re.search(r"GLOBAL (\S+)", str(e))
        why = (f"it pickles {refused.group(1)}, which is not on the allowlist" if refused
               else str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise ConversionError(f"{path} cannot be read safely: {why}; the release holds tensors, "
                              f"plain values and numpy RNG state only, and a file is never "
                              f"unpickled with weights_only=False") from None
    state = checkpoint.get("module", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} holds no state dict of tensors under 'module'")
    return state


def released_tokenizer(model_path: str) -> SentencePieceTokenizer:
    """Their sentencepiece model with `<|endoftext|>` appended at id = its piece count (50000),
    as a control piece that is also the end-of-document id."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(model_path, "rb") as f:
            proto.ParseFromString(f.read())
    except (OSError, ValueError) as e:
        raise ConversionError(f"--tokenizer {model_path}: not a sentencepiece model ({e}); give "
                              f"chinese_sentencepiece/cog-pretrain.model") from None
    if any(p.piece == END_OF_TEXT for p in proto.pieces):
        raise ConversionError(f"--tokenizer {model_path} already has {END_OF_TEXT}; give the "
                              f"original sentencepiece model")
    piece = proto.pieces.add()
    piece.piece, piece.score = END_OF_TEXT, 0.0
    piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    proto.trainer_spec.eos_id, proto.trainer_spec.eos_piece = len(proto.pieces) - 1, END_OF_TEXT
    try:
        return SentencePieceTokenizer(proto.SerializeToString(), source=model_path)
    except TokenizerError as e:
        raise ConversionError(str(e)) from None


def convert(source: str, out_dir: str, tokenizer_model: str, tp_size: int = 1, **fields) -> str:
    """Write the release at `source` as our checkpoint in `out_dir`; returns the tag directory."""
    path = released_file(source)
    tokenizer = released_tokenizer(tokenizer_model)
    state = read_released(path)
    try:
        cfg = released_config(state, tokenizer.vocab_size, **fields)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    spec = get_model_spec("transformer_xl")
    try:
        spec.layout(cfg, tp_size)  # the model's own checks: heads, FFN, vocabulary split
    except ValueError as e:
        raise ConversionError(f"cannot shard over --tensor-model-parallel-size {tp_size}: "
                              f"{e}") from None
    full = state_from_released(state, cfg)
    del state
    try:
        shards = shard_state_dict(full, spec, cfg, tp_size)
    except ReshardError as e:
        raise ConversionError(f"{path}: {e}") from None
    del full
    meta = CheckpointMeta.for_model(spec, cfg, tp_size, tokenizer,
                                    converted_from=os.path.abspath(path))
    return write_weights_only_checkpoint(out_dir, meta, shards, tokenizer)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("source", help=f"the release's directory (holding {RELEASED_FILE}) or file")
    p.add_argument("out_ckpt", help="our checkpoint directory to write (must not hold one)")
    p.add_argument("--tokenizer", required=True,
                   help="their sentencepiece model (chinese_sentencepiece/cog-pretrain.model)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--mem-length", type=int, default=256,
                   help="positions each layer remembers (the release: 256)")
    p.add_argument("--max-position-embeddings", type=int, default=768,
                   help="longest key span, segment plus memory (the release: 512 + 256)")
    args = p.parse_args(argv)
    if args.tensor_model_parallel_size < 1:
        p.error("--tensor-model-parallel-size must be >= 1")
    try:
        path = convert(args.source, args.out_ckpt, args.tokenizer, args.tensor_model_parallel_size,
                       mem_length=args.mem_length,
                       max_position_embeddings=args.max_position_embeddings)
    except (ConversionError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
