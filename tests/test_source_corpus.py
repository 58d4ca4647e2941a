"""`ttt-index corpus`: trees, wheels, sdists and installed distributions as Pile-format JSONL."""

from __future__ import annotations

import importlib.metadata
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import cli

from index_server import source_corpus as sc
from index_server.source_corpus import SourceCorpusConfig, split_of, write_source_corpus

CODE = "def f(x):\n    return x + 1\n"


def records(out: Path, name: str = "corpus") -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (out / f"{name}.{s}.jsonl").read_text(encoding="utf-8").splitlines()]
            for s in sc.SPLITS}


def by_path(out: Path) -> dict[str, dict]:
    return {r["meta"]["path"]: {**r, "split": s} for s, rs in records(out).items() for r in rs}


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "pkg" / "mod.py").write_text(CODE)
    (root / "pkg" / "copy.py").write_text(CODE)  # same content: kept once
    (root / "README.md").write_text("# Project\n\nProse about it.\n")
    (root / "notes.rst").write_text("Notes\n=====\n")
    (root / "kernel.c").write_text("// SPDX-License-Identifier: GPL-2.0-only\nint main(void) { return 0; }\n")
    (root / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "empty.py").write_text("")
    (root / "blank.py").write_text("   \n\n")
    (root / "big.py").write_text("x = 1\n" * 400)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "COPYING").write_text("SPDX-License-Identifier: MIT\n\nPermission is hereby granted ...\n")
    return root


def test_a_tree_becomes_documents_with_every_skip_counted(tree, tmp_path):
    out = tmp_path / "out"
    summary = write_source_corpus(SourceCorpusConfig(out, inputs=(tree,), max_bytes=1000, progress=False))
    docs = by_path(out)
    # files are read in path order: pkg/copy.py comes first and is the copy kept
    assert set(docs) == {"pkg/copy.py", "README.md", "notes.rst", "kernel.c", "COPYING"}
    (source,) = summary["sources"]
    assert source["skipped"] == {sc.DUPLICATE: 1, sc.BINARY: 1, sc.NOT_UTF8: 1, sc.TOO_SMALL: 1, sc.EMPTY: 1,
                                 sc.TOO_LARGE: 1, sc.EXCLUDED: 1, sc.NOT_A_FILE: 1}
    assert sum(summary["documents"].values()) == 5 == sum(source["kept"].values())
    assert docs["README.md"]["meta"]["pile_set_name"] == "Markdown"
    assert docs["notes.rst"]["meta"]["pile_set_name"] == "reStructuredText"
    assert docs["pkg/copy.py"]["meta"]["pile_set_name"] == "Github"
    assert docs["pkg/copy.py"]["text"] == CODE and docs["pkg/copy.py"]["meta"]["source"] == "proj"
    assert docs["kernel.c"]["meta"]["license"] == "GPL-2.0-only"  # the file's own SPDX line
    assert docs["pkg/copy.py"]["meta"]["license"] == "MIT"  # else the tree's COPYING
    for path, doc in docs.items():
        assert doc["split"] == split_of(path, 0.05, 0.05)
    assert json.loads((out / "summary.json").read_text()) == summary
    # every line is valid input for `ttt-index build`
    from index_server.corpus import check_line

    for split in sc.SPLITS:
        for line in (out / f"corpus.{split}.jsonl").read_bytes().splitlines():
            assert check_line(line) == (None, False)


def test_reruns_agree_and_globs_and_fractions_apply(tree, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_source_corpus(SourceCorpusConfig(a, inputs=(tree,), progress=False))
    write_source_corpus(SourceCorpusConfig(b, inputs=(tree,), progress=False))
    assert all((a / f"corpus.{s}.jsonl").read_bytes() == (b / f"corpus.{s}.jsonl").read_bytes() for s in sc.SPLITS)
    c = tmp_path / "c"
    write_source_corpus(SourceCorpusConfig(c, inputs=(tree,), include=("*.py",), exclude=("pkg/mod.py",),
                                           test_fraction=0.0, validation_fraction=0.0, progress=False))
    assert {p: d["split"] for p, d in by_path(c).items()} == {"pkg/copy.py": "index", "big.py": "index"}


def test_split_fractions_and_one_side_per_path():
    paths = [f"src/module_{i}.py" for i in range(20000)]
    splits = [split_of(p, 0.1, 0.2) for p in paths]
    assert abs(splits.count("test") / len(paths) - 0.2) < 0.02
    assert abs(splits.count("validation") / len(paths) - 0.1) < 0.02
    assert splits == [split_of(p, 0.1, 0.2) for p in paths]


def _wheel(path: Path, name: str, version: str, files: dict[str, str], licence: str = "Apache-2.0") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for rel, text in files.items():
            z.writestr(rel, text)
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\nLicense-Expression: {licence}\n")
    return path


def _sdist(path: Path, name: str, version: str, files: dict[str, str]) -> Path:
    top = f"{name}-{version}"
    pkg_info = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nLicense: UNKNOWN\n"
                f"Classifier: License :: OSI Approved :: BSD License\n")
    with tarfile.open(path, "w:gz") as t:
        for rel, text in {**files, "PKG-INFO": pkg_info}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_wheels_sdists_and_installed_packages_record_source_version_and_licence(tmp_path):
    wheel = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", "demo", "1.0", {"demo/a.py": "A = 1\n"})
    sdist = _sdist(tmp_path / "other-2.0.tar.gz", "other", "2.0", {"other/b.py": "B = 2\n", "docs/x.txt": "text\n"})
    out = tmp_path / "out"
    write_source_corpus(SourceCorpusConfig(out, inputs=(wheel, sdist), packages=("filelock",), progress=False))
    docs = by_path(out)
    assert docs["demo/a.py"]["meta"] | {"sha256": None} == {
        "pile_set_name": "Github", "path": "demo/a.py", "source": "demo", "version": "1.0", "license": "Apache-2.0",
        "sha256": None}
    # the sdist's top directory is stripped; the licence comes from its classifiers
    assert docs["other/b.py"]["meta"]["license"] == "BSD License"
    assert docs["docs/x.txt"]["meta"]["version"] == "2.0" and docs["docs/x.txt"]["meta"]["pile_set_name"] == "Text"
    installed = [d for d in docs.values() if d["meta"]["source"] == "filelock"]
    assert installed and {d["meta"]["version"] for d in installed} == {importlib.metadata.version("filelock")}
    assert any(d["meta"]["path"] == "filelock/__init__.py" for d in installed)


def test_two_releases_keep_a_path_on_one_side(tmp_path):
    files = {f"pkg/m{i}.py": f"V = {i}\n" for i in range(60)}
    old = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", "pkg", "1.0", files)
    new = _wheel(tmp_path / "pkg-2.0-py3-none-any.whl", "pkg", "2.0", {p: t + "W = 0\n" for p, t in files.items()})
    out = tmp_path / "out"
    write_source_corpus(SourceCorpusConfig(out, inputs=(old, new), test_fraction=0.3, progress=False))
    sides: dict[str, set] = {}
    for split, rs in records(out).items():
        for r in rs:
            if r["meta"]["path"].startswith("pkg/"):
                sides.setdefault(r["meta"]["path"], set()).add(split)
    assert len(sides) == 60 and all(len(s) == 1 for s in sides.values())
    assert len([r for rs in records(out).values() for r in rs if r["meta"]["path"].startswith("pkg/")]) == 120


def test_bad_inputs_are_one_clear_error_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "only.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=r"no document in .*empty: every file was skipped \(1 binary"):
        write_source_corpus(SourceCorpusConfig(out, inputs=(empty,), progress=False))
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    missing = cli(capsys, "ttt-index", "corpus", str(tmp_path / "nope"), "--out", str(out), check=False)
    assert missing.returncode == 2 and "nope: no such directory or archive" in missing.stderr
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="--package no-such-dist"):
        write_source_corpus(SourceCorpusConfig(out, packages=("no-such-dist",), progress=False))
    with pytest.raises(ValueError, match="fractions"):
        SourceCorpusConfig(out, inputs=(empty,), validation_fraction=0.5, test_fraction=0.5)


def test_an_unreadable_file_is_counted(tree, tmp_path, monkeypatch):
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "notes.rst":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    summary = write_source_corpus(SourceCorpusConfig(tmp_path / "out", inputs=(tree,), progress=False))
    assert summary["sources"][0]["skipped"][sc.UNREADABLE] == 1


def test_cli_prints_the_summary_and_overwrites_only_its_own_output(tree, tmp_path, capsys):
    out = tmp_path / "out"
    proc = cli(capsys, "ttt-index", "corpus", str(tree), "--out", str(out), "--quiet", "--name", "proj")
    assert "proj" in proc.stdout and "skipped" in proc.stdout and (out / "proj.index.jsonl").is_file()
    again = cli(capsys, "ttt-index", "corpus", str(tree), "--out", str(out), "--quiet", check=False)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    cli(capsys, "ttt-index", "corpus", str(tree), "--out", str(out), "--quiet", "--overwrite")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = cli(capsys, "ttt-index", "corpus", str(tree), "--out", str(other), "--overwrite", check=False)
    assert refused.returncode == 2 and "not an output of this tool" in refused.stderr


def test_an_output_inside_the_input_tree_is_never_read_back(tree):
    out = tree / "corpus"  # `ttt-index corpus . --out corpus`
    first = write_source_corpus(SourceCorpusConfig(out, inputs=(tree,), progress=False))
    first_docs = by_path(out)
    again = write_source_corpus(SourceCorpusConfig(out, inputs=(tree,), overwrite=True, progress=False))
    assert by_path(out) == first_docs and again["documents"] == first["documents"]
    assert not [p for p in first_docs if p.startswith(("corpus/", ".corpus"))]
    assert again["sources"][0]["skipped"] == first["sources"][0]["skipped"]


def test_excluded_and_oversized_files_are_not_read(tree, tmp_path, monkeypatch):
    read = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real(self))
    summary = write_source_corpus(SourceCorpusConfig(tmp_path / "out", inputs=(tree,), max_bytes=1000,
                                                     progress=False))
    assert summary["sources"][0]["skipped"][sc.TOO_LARGE] == 1 and summary["sources"][0]["skipped"][sc.EXCLUDED] == 1
    assert "big.py" not in read and "HEAD" not in read and "mod.py" in read


def test_a_corrupt_archive_is_one_clear_error_before_any_work(tmp_path, capsys):
    bad_wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    bad_wheel.write_bytes(b"not a zip at all")
    sdist = _sdist(tmp_path / "other-2.0.tar.gz", "other", "2.0", {"other/b.py": "B = 2\n" * 2000})
    truncated = tmp_path / "cut-2.0.tar.gz"
    truncated.write_bytes(sdist.read_bytes()[:200])
    out = tmp_path / "out"
    for archive in (bad_wheel, truncated):
        proc = cli(capsys, "ttt-index", "corpus", str(archive), "--out", str(out), check=False)
        assert proc.returncode == 2 and f"{archive}: not a readable archive" in proc.stderr, proc.stderr
        assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_tree_given_as_dot_is_named_by_its_directory(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tree)
    write_source_corpus(SourceCorpusConfig(tmp_path / "out", inputs=(Path("."),), progress=False))
    assert {d["meta"]["source"] for d in by_path(tmp_path / "out").values()} == {"proj"}
