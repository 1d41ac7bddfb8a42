import json
import itertools

import pytest
import torch

from megatron_lite.data.objectives.prompt_text import PromptTextDataset
from tests.data.conftest import tiny_char_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def finetune_head(sample_data, tmp_path_factory):
    """The first 3000 pairs of the sample fine-tuning file (the whole file takes ~2 s to read)."""
    path = tmp_path_factory.mktemp("prompt_text") / "finetune_head.jsonl"
    with open(sample_data.finetune, encoding="utf-8") as src:
        path.write_text("".join(itertools.islice(src, 3000)), encoding="utf-8")
    return path


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_sample(s, tokens, num_prompt, seq, pad):
    """Inputs + last label rebuild the tokens; loss exactly on labels that are text or eod."""
    n = len(tokens) - 1
    ids, labels, mask = s["input_ids"].tolist(), s["labels"].tolist(), s["loss_mask"].tolist()
    assert ids[:n] + labels[n - 1:n] == tokens
    assert ids[n:] == [pad] * (seq - n) and labels[n:] == [pad] * (seq - n)
    assert mask == [1.0 if num_prompt <= t + 1 < len(tokens) else 0.0 for t in range(seq)]


def test_reconstructs_pairs_and_masks_the_prompt(sample_data, finetune_head):
    tok = sample_data.char_tokenizer
    seq = 256
    ds = PromptTextDataset(finetune_head, tok, seq, eod_id=tok.eod_id, return_source=True)
    recs = records(finetune_head)
    assert len(ds) == len(recs) == 3000
    truncated = 0
    for i, r in enumerate(recs):
        prompt, text = tok.encode(r["prompt"]), tok.encode(r["text"]) + [tok.eod_id]
        keep = min(len(prompt), seq + 1 - len(text))  # left truncation of long prompts
        truncated += keep < len(prompt)
        tokens = prompt[len(prompt) - keep:] + text
        s = ds[i]
        assert s["source_ids"].tolist() == tokens
        check_sample(s, tokens, keep, seq, tok.pad_id)
    assert truncated > 10  # some reviews are longer than 256 characters
    assert torch.equal(ds[len(ds) + 3]["input_ids"], ds[3]["input_ids"])


def test_reject_and_text_too_long(tmp_path):
    tok = tiny_char_tokenizer()
    a, b = chr(0x4E00), chr(0x4E01)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": a * 3, "text": b * 2}) + "\n\n"
                    + json.dumps({"prompt": a * 9, "text": b * 2}) + "\n", encoding="utf-8")
    ds = PromptTextDataset(path, tok, 6, truncate="left", eod_id=tok.eod_id)
    assert len(ds) == 2  # the blank line is skipped
    check_sample(ds[1], tok.encode(a * 4 + b * 2) + [tok.eod_id], 4, 6, tok.pad_id)
    with pytest.raises(ValueError, match=f"{path}:3: .*seq_length"):
        PromptTextDataset(path, tok, 6, truncate="reject", eod_id=tok.eod_id)
    with pytest.raises(ValueError, match=f"{path}:1: the text alone"):
        PromptTextDataset(path, tok, 1, eod_id=tok.eod_id)


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "a", "text": "b"}\n{"prompt": "a", "text": \n', r":2: malformed JSON"),
    (b'{"prompt": "a"}\n', r":1: key 'text' is missing"),
    (b'{"prompt": 3, "text": "b"}\n', r":1: key 'prompt' is not a string"),
    (b'["prompt", "text"]\n', r":1: expected an object"),
    (b'{"prompt": "a", "text": "\xff"}\n', r":1: invalid UTF-8"),
    (b'{"prompt": "a", "text": ""}\n', r":1: empty 'text'"),
    (b"\n\n", r": no examples"),
])
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path) + message):
        PromptTextDataset(path, tiny_char_tokenizer(), 16)
