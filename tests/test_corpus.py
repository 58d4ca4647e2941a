import json
from pathlib import Path

import pytest

from index_server.build import BuildConfig, build_index
from index_server.corpus import CorpusFormatError, CorpusStore, scan_corpus


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


GOOD = b'{"text": "def f():\\n    return 1\\n", "meta": {"pile_set_name": "Github"}}\n'


@pytest.mark.parametrize(
    "payload, line, message",
    [
        (GOOD + b'{"text": "unterminated\n', 2, "invalid JSON"),
        (GOOD + GOOD + b'{"meta": {}}\n', 3, 'missing "text"'),
        (GOOD + b'{"text": "caf\xe9"}\n', 2, "byte offset 13 is not valid UTF-8 (0xe9)"),
        (b'["text"]\n', 1, "expected a JSON object"),
        (b'{"text": 7}\n', 1, '"text" must be a string'),
    ],
)
def test_malformed_line_names_file_and_line_and_writes_nothing(tmp_path, payload, line, message):
    corpus = write(tmp_path / "c.jsonl", payload)
    out = tmp_path / "index"
    with pytest.raises(CorpusFormatError) as err:
        build_index(BuildConfig(corpus=(corpus,), output=out, progress=False))
    assert f"{corpus}:{line}: " in str(err.value)
    assert message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no index, no scratch dir


def test_empty_file_is_an_error(tmp_path):
    corpus = write(tmp_path / "empty.jsonl", b"")
    with pytest.raises(CorpusFormatError, match=rf"{corpus}:1: file is empty"):
        scan_corpus([corpus], progress=False)


def test_every_problem_is_listed_not_just_the_first(tmp_path):
    corpus = write(tmp_path / "c.jsonl", b"{bad\n" + GOOD + b'{"x": 1}\n')
    with pytest.raises(CorpusFormatError) as err:
        scan_corpus([corpus], progress=False)
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{corpus}:1", f"{corpus}:3"]


def test_store_reads_exact_texts_through_offsets_and_skips_empty_documents(tmp_path):
    records = [{"text": "alpha ünïcode", "meta": {"a": 1}}, {"text": "   "}, {"text": "beta\nline"}, {"text": ""}]
    a = write(tmp_path / "a.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    b = write(tmp_path / "b.jsonl", b'\n{"text": "gamma"}\r\n')  # blank line and CRLF
    scan = scan_corpus([a, b], progress=False)
    assert scan.empty_documents == 2
    store = CorpusStore.from_scan(scan)
    assert [store.text(i) for i in range(len(store))] == ["alpha ünïcode", "beta\nline", "gamma"]
    doc = store.document(2)
    assert (Path(doc.path).name, doc.line) == ("b.jsonl", 2)
    assert store.document(0).meta == {"a": 1}
    assert [f.size for f in scan.files] == [a.stat().st_size, b.stat().st_size]
    with pytest.raises(IndexError):
        store.text(3)
