import json
from pathlib import Path

import pytest

from index_server.build import BuildConfig, build_index
from index_server.corpus import CorpusChangedError, CorpusFormatError, CorpusStore
from index_server.embed import plan_layout, scan_part
from index_server.encoder import EncoderConfig


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


GOOD = b'{"text": "def f():\\n    return 1\\n", "meta": {"pile_set_name": "Github"}}\n'


def scan(*paths: Path, parts: int = 1):
    layout = plan_layout(paths, EncoderConfig(), 4, "float32", parts)
    return layout, [scan_part(layout, p) for p in range(layout.num_parts)]


@pytest.mark.parametrize(
    "payload, line, message",
    [
        (GOOD + b'{"text": "unterminated\n', 2, "invalid JSON"),
        (GOOD + GOOD + b'{"meta": {}}\n', 3, 'missing "text"'),
        (GOOD + b'{"text": "caf\xe9"}\n', 2, "byte offset 13 is not valid UTF-8 (0xe9)"),
        (b'["text"]\n', 1, "expected a JSON object"),
        (b'{"text": 7}\n', 1, '"text" must be a string'),
        (GOOD + b'{"text": "bad \\ud800 surrogate"}\n', 2, "lone surrogate '\\ud800' at character 4"),
    ],
)
def test_malformed_line_names_file_and_line_and_writes_nothing(tmp_path, payload, line, message):
    corpus = write(tmp_path / "c.jsonl", payload)
    out = tmp_path / "index"
    with pytest.raises(CorpusFormatError) as err:
        build_index(BuildConfig(output=out, corpus=(corpus,), progress=False))
    assert f"{corpus}:{line}: " in str(err.value)
    assert message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no index, no scratch dir


def test_line_numbers_are_exact_in_later_parts(tmp_path):
    lines = [json.dumps({"text": f"document number {i} " + "x" * (i % 7)}) + "\n" for i in range(40)]
    lines[33] = '{"text": broken}\n'
    corpus = write(tmp_path / "c.jsonl", "".join(lines).encode())
    with pytest.raises(CorpusFormatError, match=rf"{corpus}:34: invalid JSON"):
        scan(corpus, parts=5)


def test_empty_and_compressed_files_are_refused_up_front(tmp_path):
    empty = write(tmp_path / "empty.jsonl", b"")
    with pytest.raises(CorpusFormatError, match=rf"{empty}:1: file is empty"):
        scan(empty)
    zst = write(tmp_path / "pile.jsonl.zst", b"\x28\xb5\x2f\xfd rest of a zstd frame")
    with pytest.raises(CorpusFormatError, match=rf"zstd -d {zst} -o {tmp_path / 'pile.jsonl'}"):
        scan(zst)


def test_every_problem_is_listed_not_just_the_first(tmp_path):
    corpus = write(tmp_path / "c.jsonl", b"{bad\n" + GOOD + b'{"x": 1}\n')
    with pytest.raises(CorpusFormatError) as err:
        scan(corpus)
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{corpus}:1", f"{corpus}:3"]


@pytest.mark.parametrize("parts", [1, 3])
def test_store_reads_exact_texts_through_offsets_and_skips_empty_documents(tmp_path, parts):
    import numpy as np

    records = [{"text": "alpha ünïcode", "meta": {"a": 1}}, {"text": "   "}, {"text": "beta\nline"}, {"text": ""}]
    a = write(tmp_path / "a.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    b = write(tmp_path / "b.jsonl", b'\n{"text": "gamma"}\r\n')  # blank line and CRLF
    layout, scanned = scan(a, b, parts=parts)
    assert sum(s.meta.empty_documents for s in scanned) == 2
    from index_server.build import corpus_files, doc_tables

    for s in scanned:  # doc_table reads the parts' files: write them as an embed run would
        from index_server.embed import write_part

        write_part(tmp_path, s, np.zeros((s.meta.n_docs, 4), dtype="float32"))
    metas = [s.meta for s in scanned]
    store = CorpusStore(corpus_files(layout, metas), np.concatenate(list(doc_tables(tmp_path, metas))),
                        Path(layout.corpus_root))
    assert [store.text(i) for i in range(len(store))] == ["alpha ünïcode", "beta\nline", "gamma"]
    doc = store.document(2)
    assert (Path(doc.path).name, doc.line) == ("b.jsonl", 2)
    assert (store.document(1).line, store.document(0).meta) == (3, {"a": 1})
    with pytest.raises(IndexError):
        store.text(3)


def test_corpus_rewritten_in_place_is_an_error_naming_the_file_not_a_crash(small_corpus, tmp_path):
    """A memory-mapped corpus truncated under a reader is SIGBUS: reads check the file first."""
    import shutil

    from index_server.search import LocalIndex

    corpus = tmp_path / "corpus" / small_corpus.name
    corpus.parent.mkdir()
    shutil.copy(small_corpus, corpus)
    from conftest import build_small

    index = LocalIndex(build_small(corpus, tmp_path / "idx"))
    assert index.texts([5])[0]
    with open(corpus, "r+b") as f:
        f.truncate(1000)  # a careless user, or a sync job, rewrites the file
    with pytest.raises(CorpusChangedError, match=rf"{corpus}: corpus file changed"):
        index.texts([200])
