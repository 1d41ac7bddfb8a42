"""Generate text from a checkpoint, at its tensor-parallel size (or any, from an export).

TP=1 checkpoint, one process (no prompt given: an interactive prompt loop):
    python generate.py --load runs/tiny_MP1
    python generate.py --load runs/tiny_MP1 --prompt "中国人民" --greedy --max-new-tokens 32
TP=2 checkpoint, two ranks (each holds half of every sharded layer; torchrun works as well):
    deepspeed --num_gpus 2 generate.py --load runs/demo --prompt "中国人民" --top-p 0.9
Many prompts, one JSON line each ({"prompt": ..., "completion": ...}):
    python generate.py --load runs/tiny_MP1 --input-file prompts.txt --output-file out.jsonl
A checkpoint saved at another TP size: reshard it first (python change_mp.py CKPT_DIR N), or
export it (merged TP=1 safetensors + config + tokenizer, no pickle), which loads at any TP size:
    python generate.py --load runs/demo --export safetensors runs/demo_export

`scripts/generate_text.sh CKPT` reads the TP size from the checkpoint and launches this.

How a model generates is its registry record's `generation` strategy: `causal` continues the
prompt (GPT / LingLong; a backward model writes what precedes it), `seq2seq` writes a target for
the prompt as source (T5: `<extra_id_k>` marks a span to fill), `recurrent` reads the prompt in
segments of any length and continues it with a rolling memory (Transformer-XL: each new token
reads the last mem_length positions, their keys/values cached); a model declaring `none` (an
encoder) does not generate, and this script says so and exits with status 1. A checkpoint of a
model defined outside megatron_lite needs the `--model-module` it was trained with.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.checkpointing import (TOKENIZER_DIR, read_latest_tag,
                                                    read_model_states)
from megatron_lite.checkpoint.verify import CheckpointInvalid, verify_tag
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.inference.export import (CONFIG_FILE, export_safetensors, is_export,
                                            read_export)
from megatron_lite.inference.generation import generate
from megatron_lite.inference.recurrent import check_segment_length, generate_recurrent
from megatron_lite.inference.seq2seq import encode_source, generate_seq2seq
from megatron_lite.models.registry import get_model_spec, import_model_modules
from megatron_lite.parallel import ParallelState, RNGContext
from megatron_lite.parallel.launch import destroy_distributed, exit_process, init_distributed
import megatron_lite.models  # noqa: F401  (registers the architectures)

STOP_WORDS = ("stop", "exit", "quit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True,
                   help="checkpoint directory (the one holding 'latest'), or an export directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--input-file", default=None,
                   help="prompts, one per line (a JSON object line gives its \"prompt\")")
    p.add_argument("--output-file", default=None,
                   help="write one JSON line per prompt: {\"prompt\": ..., \"completion\": ...}")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoder-start-token-id", type=int, default=None,
                   help="T5: first decoder id (default: the model's, the pad id; LongLM's "
                        "released scripts use 1)")
    p.add_argument("--segment-length", type=int, default=None,
                   help="Transformer-XL: prompt tokens read per forward (default: "
                        "max_position_embeddings - mem_length)")
    p.add_argument("--no-eos-stop", action="store_true", help="do not stop at end of text")
    p.add_argument("--json", action="store_true", help="print one JSON line per prompt")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "DIR"), default=None,
                   help="write the checkpoint as FORMAT (safetensors) to DIR and exit: merged "
                        "TP=1 weights, config.json and the tokenizer, loadable without pickle")
    p.add_argument("--model-module", action="append", default=[], metavar="MODULE",
                   help="import MODULE (dotted name or .py path) first: the checkpoint's model is "
                        "defined there (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def read_model(load_dir: str, ps: ParallelState, tag: str | None = None):
    """(this rank's state dict, spec, config dict, tokenizer dir) of a checkpoint or an export."""
    if is_export(load_dir):
        _check_tp_size(load_dir, ps.tp_size)
        state, meta = read_export(load_dir, ps)
        model, model_config, module = meta["model"], meta["model_config"], meta.get("model_module")
        tokenizer_dir = os.path.join(load_dir, TOKENIZER_DIR)
    else:
        tag = tag or read_latest_tag(load_dir)
        try:  # DeepSpeed is not involved here, but a truncated or tampered file is named early
            warning = verify_tag(os.path.join(load_dir, tag))
        except CheckpointInvalid as e:
            raise SystemExit(f"error: {e}") from None
        if warning and ps.tp_rank == 0:
            print(f"warning: {warning}", file=sys.stderr)
        state, meta, ckpt_dir = read_model_states(load_dir, ps.tp_rank, tag=tag)
        if meta.tp_size != ps.tp_size:
            raise SystemExit(
                f"{ckpt_dir} was saved at tensor-parallel size {meta.tp_size} but this run has "
                f"{ps.tp_size} rank(s). Run it with {meta.tp_size} rank(s) (deepspeed --num_gpus "
                f"{meta.tp_size} generate.py ...), or reshard it: python change_mp.py {load_dir} "
                f"{ps.tp_size}")
        model, model_config, module = meta.model, meta.model_config, meta.model_module
        tokenizer_dir = os.path.join(ckpt_dir, TOKENIZER_DIR)
    try:
        spec = get_model_spec(model, where=load_dir, module=module)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    return state, spec, model_config, tokenizer_dir


def _check_tp_size(export_dir: str, tp_size: int) -> None:
    """An export loads at any TP size that divides the heads (and FFN, vocabulary); another is a
    one-line error before any shard is cut."""
    with open(os.path.join(export_dir, CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    try:
        spec = get_model_spec(config.get("model"), where=export_dir,
                              module=config.get("model_module"))
        spec.layout(spec.make_config(config["model_config"]), tp_size)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    except ValueError as e:
        raise SystemExit(f"error: {export_dir} cannot run at model-parallel size {tp_size}: {e}; "
                         f"launch a size that divides it") from None


def load_model(load_dir: str, ps: ParallelState, tag: str | None = None):
    """(model, tokenizer, spec) of a checkpoint or an export, built at `ps`'s TP size."""
    state, spec, model_config, tokenizer_dir = read_model(load_dir, ps, tag)
    if spec.generation == "none":
        raise SystemExit(f"{load_dir} holds a '{spec.name}' model, which does not generate text "
                         f"(its registry record declares generation 'none': an encoder). "
                         f"Evaluate it, or fine-tune it for a task, instead")
    if spec.generation not in GENERATORS:
        raise SystemExit(f"{load_dir} holds a '{spec.name}' model, whose generation strategy "
                         f"'{spec.generation}' this generate.py does not implement")
    cfg = spec.make_config(model_config)
    model = spec.build(cfg, ps, RNGContext(0, dp_rank=ps.dp_rank, tp_rank=ps.tp_rank))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, load_tokenizer(tokenizer_dir), spec


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line; a line holding a JSON object gives its "prompt" field."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: a line starting with '{{' must be a JSON object "
                                     f"with a \"prompt\" field ({e})") from None
                if not isinstance(obj.get("prompt"), str):
                    raise SystemExit(f"{path}:{n}: the JSON object has no string \"prompt\" field")
                line = obj["prompt"]
            prompts.append(line)
    if not prompts:
        raise SystemExit(f"{path} holds no prompts (one per line)")
    return prompts


class Generator:
    """A loaded model plus the sampling settings of the command line; one subclass per
    generation strategy."""

    def __init__(self, model, tokenizer, args):
        self.model, self.tokenizer, self.args = model, tokenizer, args

    def sampling(self, seed: int) -> dict:
        a = self.args
        return dict(greedy=a.greedy, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    repetition_penalty=a.repetition_penalty, seed=seed)

    def __call__(self, prompts: list[str], seed: int) -> list[dict]:
        outputs = self.generate(prompts, seed)
        return [{"prompt": p, "completion": self.tokenizer.decode(out), "ids": out}
                for p, out in zip(prompts, outputs)]


class CausalGenerator(Generator):
    """Continues the prompt. A backward model (LingLong-Backward: its config's `backward`)
    writes the text that comes before the prompt."""

    def generate(self, prompts, seed):
        ids = [self.tokenizer.encode(p) for p in prompts]
        empty = [p for p, i in zip(prompts, ids) if not i]
        if empty:
            raise SystemExit(f"error: prompt {empty[0]!r} encodes to no tokens; give text the "
                             f"tokenizer keeps (a line of only spaces or control characters "
                             f"is not one)")
        eos = None if self.args.no_eos_stop else self.tokenizer.eod_id
        return self._run(ids, eos, seed)

    def _run(self, ids, eos, seed):
        return generate(self.model, ids, self.args.max_new_tokens, eos_id=eos,
                        **self.sampling(seed))

    def text(self, r: dict) -> str:
        backward = getattr(self.model.cfg, "backward", False)
        return r["completion"] + r["prompt"] if backward else r["prompt"] + r["completion"]


class RecurrentGenerator(CausalGenerator):
    """Continues the prompt with a rolling segment memory (Transformer-XL)."""

    def __init__(self, model, tokenizer, args):
        super().__init__(model, tokenizer, args)
        try:  # a bad --segment-length (or a model without memory) is refused before any prompt
            check_segment_length(model.cfg, args.segment_length)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    def _run(self, ids, eos, seed):
        return generate_recurrent(self.model, ids, self.args.max_new_tokens, eos_id=eos,
                                  segment_length=self.args.segment_length, **self.sampling(seed))


class Seq2SeqGenerator(Generator):
    """The prompt is the encoder's input (`<extra_id_k>` marks a span to fill) and the output the
    decoder's text, not a continuation of the prompt."""

    def sources(self, prompts) -> list[list[int]]:
        """Encoder ids, in the checkpoint's convention (an imported HF T5 ends them with </s>,
        as transformers' tokenizer does; the decoder start is its config's too)."""
        eos = getattr(self.model.cfg, "append_eos_to_source", False)
        return [encode_source(self.tokenizer, p, append_eos=eos) for p in prompts]

    def generate(self, prompts, seed):
        eos = None if self.args.no_eos_stop else self.tokenizer.eos_id
        return generate_seq2seq(
            self.model, self.sources(prompts), self.args.max_new_tokens, eos_id=eos,
            decoder_start_token_id=self.args.decoder_start_token_id, **self.sampling(seed))

    def text(self, r: dict) -> str:
        return f"{r['prompt']}\t=> {r['completion']}"


GENERATORS = {"causal": CausalGenerator, "seq2seq": Seq2SeqGenerator,
              "recurrent": RecurrentGenerator}
"""Generation strategy (ModelSpec.generation) -> its generator."""


def _emit(gen: Generator, results: list[dict], args, out_file, rank0: bool):
    if not rank0:
        return
    for r in results:
        line = json.dumps({"prompt": r["prompt"], "completion": r["completion"]},
                          ensure_ascii=False)
        print(line if args.json else gen.text(r), flush=True)
        if out_file is not None:
            out_file.write(line + "\n")
            out_file.flush()


def _read_interactive(rank0: bool) -> str | None:
    """The next prompt typed on rank 0, shared with every rank; None ends the loop."""
    line = None
    if rank0:
        try:
            line = input("Context prompt (stop to exit) >>> ")
        except EOFError:
            line = None
        if line is not None and line.strip().lower() in STOP_WORDS:
            line = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.export:
        try:
            import_model_modules(args.model_module)
        except ImportError as e:
            raise SystemExit(f"error: {e}") from None
        fmt, out_dir = args.export
        if fmt != "safetensors":
            raise SystemExit(f"--export {fmt}: the supported format is safetensors")
        try:
            export_safetensors(args.load, out_dir, tag=args.tag)
        except (ValueError, FileExistsError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"exported {args.load} to {out_dir} (model.safetensors, config.json, tokenizer/)")
        return out_dir
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size {args.batch_size} must be >= 1")
    prompts = list(args.prompt)
    if args.input_file:
        prompts += read_prompts(args.input_file)

    try:
        import_model_modules(args.model_module)
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None
    owns_dist = init_distributed()
    try:
        ps = ParallelState.from_world(dist.get_world_size())
        rank0 = dist.get_rank() == 0
        model, tokenizer, spec = load_model(args.load, ps, args.tag)
        gen = GENERATORS[spec.generation](model, tokenizer, args)
        out_file = open(args.output_file, "w", encoding="utf-8") if args.output_file and rank0 \
            else None
        results = []
        try:
            if prompts:
                for start in range(0, len(prompts), args.batch_size):
                    batch = gen(prompts[start:start + args.batch_size], args.seed)
                    _emit(gen, batch, args, out_file, rank0)
                    results += batch
            else:
                while (line := _read_interactive(rank0)) is not None:
                    if not line.strip():
                        continue
                    batch = gen([line], args.seed + len(results))
                    _emit(gen, batch, args, out_file, rank0)
                    results += batch
        finally:
            if out_file is not None:
                out_file.close()
        return results
    finally:
        destroy_distributed(owns_dist)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
    exit_process(0)
