import gzip
import json

import pytest

from megatron_lite.data.readers import (BadLineCounter, DataError, line_ranges, raw_lines,
                                        read_documents, read_line_block)


def write(path, data: bytes, gz=False):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)


def jsonl(*objs) -> bytes:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs).encode()


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_documents_and_line_numbers(tmp_path, gz):
    data = jsonl({"text": "第一篇"}, {"text": "第二篇", "x": 1}) + b"\n" + jsonl({"text": "三"})
    path = write(tmp_path / ("a.jsonl.gz" if gz else "a.jsonl"), data, gz)
    docs = list(read_documents(path))
    assert [d.text for d in docs] == ["第一篇", "第二篇", "三"]
    assert [d.line for d in docs] == [1, 2, 4]  # the blank line is a separator, not a document
    assert all(d.path == path and d.key == "text" for d in docs)


def test_jsonl_several_keys_give_one_document_each(tmp_path):
    path = write(tmp_path / "a.jsonl", jsonl({"title": "题", "body": "文"}, {"title": "二",
                                                                             "body": "三"}))
    docs = list(read_documents(path, json_keys=["title", "body"]))
    assert [(d.key, d.text, d.line) for d in docs] == [
        ("title", "题", 1), ("body", "文", 1), ("title", "二", 2), ("body", "三", 2)]


@pytest.mark.parametrize("gz", [False, True])
def test_text_one_document_per_line(tmp_path, gz):
    path = write(tmp_path / ("a.txt.gz" if gz else "a.txt"), "甲\r\n\n乙 丙\n".encode(), gz)
    assert [(d.text, d.line, d.key) for d in read_documents(path)] == [
        ("甲", 1, None), ("乙 丙", 3, None)]


def test_text_blank_line_documents(tmp_path):
    path = write(tmp_path / "a.txt", "一段\n二行\n\n\n三段\n  \n末\n".encode())
    docs = list(read_documents(path, blank_line_docs=True))
    assert [(d.text, d.line) for d in docs] == [("一段\n二行", 1), ("三段", 5), ("末", 7)]


def test_byte_order_mark_is_ignored(tmp_path):
    path = write(tmp_path / "a.jsonl", b"\xef\xbb\xbf" + jsonl({"text": "好"}))
    assert [d.text for d in read_documents(path)] == ["好"]


def test_several_files_in_order(tmp_path):
    a = write(tmp_path / "a.txt", "一\n".encode())
    b = write(tmp_path / "b.jsonl", jsonl({"text": "二"}))
    assert [d.text for d in read_documents([a, b])] == ["一", "二"]


BAD_LINES = {
    "malformed JSON": (b'{"text": "ok"\n', "malformed JSON"),
    "not an object": (b'["text"]\n', "expected a JSON object"),
    "missing key": (b'{"body": "x"}\n', "missing key 'text'"),
    "non-string value": (b'{"text": 3}\n', "key 'text' holds int"),
    "empty document": (b'{"text": "  "}\n', "key 'text' holds an empty document"),
    "invalid UTF-8": (b'{"text": "\xff\xfe"}\n', "invalid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_jsonl_line_names_file_and_line(tmp_path, case):
    bad, message = BAD_LINES[case]
    path = write(tmp_path / "c.jsonl", jsonl({"text": "好"}) + bad + jsonl({"text": "末"}))
    with pytest.raises(DataError) as e:
        list(read_documents(path))
    assert f"{path}:2" in str(e.value) and message in str(e.value)
    assert "--skip-bad-lines" in str(e.value)


def test_skip_bad_lines_counts_each_reason(tmp_path):
    data = jsonl({"text": "好"}) + b"".join(b for b, _ in BAD_LINES.values()) + jsonl({"text": "末"})
    path = write(tmp_path / "c.jsonl", data)
    counter = BadLineCounter()
    docs = list(read_documents(path, skip_bad_lines=True, counter=counter))
    assert [d.text for d in docs] == ["好", "末"]
    assert [d.line for d in docs] == [1, 2 + len(BAD_LINES)]
    assert counter.total == len(BAD_LINES)
    assert counter.by_reason["malformed JSON"] == 2 and counter.by_reason["missing key"] == 1
    assert "bad lines skipped: 6" in counter.summary()


def test_invalid_utf8_in_plain_text(tmp_path):
    path = write(tmp_path / "a.txt", "好\n".encode() + b"\xc3\x28\n" + "末\n".encode())
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8"):
        list(read_documents(path))
    counter = BadLineCounter()
    assert [d.text for d in read_documents(path, skip_bad_lines=True, counter=counter)] == [
        "好", "末"]
    assert counter.by_reason == {"invalid UTF-8": 1}


def test_empty_corpus(tmp_path):
    empty = write(tmp_path / "e.jsonl", b"\n\n")
    with pytest.raises(DataError, match="empty corpus.*e.jsonl"):
        list(read_documents(empty))
    all_bad = write(tmp_path / "b.jsonl", b'{"x": 1}\n')
    with pytest.raises(DataError, match=r"empty corpus.*1 bad lines skipped"):
        list(read_documents(all_bad, skip_bad_lines=True))


def test_missing_file_and_corrupt_gzip(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        list(read_documents(str(tmp_path / "nope.jsonl")))
    full = gzip.compress(jsonl(*({"text": f"文档{i}" * 50} for i in range(200))))
    broken = write(tmp_path / "t.jsonl.gz", full[:len(full) // 2])
    with pytest.raises(DataError, match="t.jsonl.gz: cannot read the gzip stream"):
        list(read_documents(broken))


def test_reader_streams(tmp_path):
    # The first document arrives before the bad last line is read: nothing is loaded up front.
    path = write(tmp_path / "s.jsonl", jsonl({"text": "一"}) + b"not json\n")
    docs = read_documents(path)
    assert next(docs).text == "一"
    with pytest.raises(DataError, match=":2: malformed JSON"):
        next(docs)


@pytest.mark.parametrize("n", [1, 2, 3, 100])
@pytest.mark.parametrize("data", [
    b'{"a": 1}\n{"bb": 22}\n\n{"c": 333333}\r\n{"d": 4}\n{"e": 5}',  # no final line end
    b"\xef\xbb\xbfx\ny\nzzzzzzzzzz\nw\n",
    b"",
])
def test_line_ranges_cover_the_file_in_whole_lines(tmp_path, n, data):
    path = write(tmp_path / "a.jsonl", data)
    ranges = list(line_ranges(path, n))
    assert sum(length for _, length in ranges) == len(data)
    assert all(length > 0 for _, length in ranges)
    offsets = [offset for offset, _ in ranges]
    assert offsets == [sum(length for _, length in ranges[:i]) for i in range(len(ranges))]
    for offset, length in ranges[:-1]:
        assert data[offset + length - 1:offset + length] == b"\n"
    if ranges:  # the first block: exactly n lines (or the whole file)
        assert ranges[0][1] == len(b"".join(data.splitlines(keepends=True)[:n]))
    # Read back block by block: the lines raw_lines gives.
    lines = [line for offset, length in ranges for line in read_line_block(path, offset, length)]
    assert lines == [raw for _, raw in raw_lines(path)]


def test_line_ranges_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(line_ranges(str(tmp_path / "nope.jsonl"), 4))
