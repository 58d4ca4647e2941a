"""``ttt-index corpus``: source trees and Python distributions as a Pile-format corpus.

Inputs are directories, archives (wheels and other zip files; sdists and other tarballs:
``.tar``, ``.tar.gz``/``.tgz``, ``.tar.xz``/``.txz``, ``.tar.bz2``) and installed Python
distributions (by name). Each file becomes one document::

    {"text": ..., "meta": {"pile_set_name": "Github", "path": "django/db/models/base.py",
                           "source": "Django", "version": "5.2.8", "license": "BSD-3-Clause",
                           "sha256": ...}}

* ``path`` is the file's path inside its source; a tarball whose members all sit under one
  top directory (an sdist's ``name-version/``, ``linux-source-6.1/``) has it stripped, so the
  same file of two releases has the same path.
* ``source``/``version``/``license`` come from the distribution's metadata where there is
  one (a wheel's ``METADATA``, an sdist's ``PKG-INFO``, an installed distribution);
  ``license`` is its ``License-Expression``, else a one-line ``License`` field, else its
  licence classifiers. Without a declared licence, a file's own ``SPDX-License-Identifier``
  line is used (most files of the Linux kernel carry one), else the identifier in the
  tree's top-level ``COPYING`` or ``LICENSE`` file; else there is no ``license``.
* ``pile_set_name``: prose by extension (``PROSE_SETS``); every other file is ``Github``,
  which is what the Pile calls a repository's files.

Files that are binary (a NUL byte), not UTF-8, unreadable, empty, outside the size limits
or excluded by the globs are skipped and counted by reason; a file whose content (sha256)
was already seen is kept once and counted. Every kept file is assigned to the index,
validation or test split by a hash of its path, so a path never lies on two sides (in two
releases of a package, say) and reruns agree. Globs and sizes are checked before a file is
read, so an excluded ``.git`` pack or an oversized data file costs a ``stat``. The output
directory appears whole or not at all (``atomic_output``), with ``summary.json`` holding the
counts; where it lies inside an input tree it (and its scratch copy) is not read back, and a
damaged archive is one error before any work.
"""

from __future__ import annotations

import email.parser
import fnmatch
import gzip
import hashlib
import importlib.metadata
import json
import lzma
import re
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from .atomic import atomic_output, names_output

SUMMARY_NAME = "summary.json"
SPLITS = ("index", "validation", "test")
FORMAT = "ttt-index corpus 1"
PROSE_SETS = {".md": "Markdown", ".markdown": "Markdown", ".rst": "reStructuredText", ".txt": "Text",
              ".adoc": "AsciiDoc", ".tex": "TeX"}
# Version-control metadata, and a wheel's RECORD (a list of file hashes, no text to learn from).
DEFAULT_EXCLUDES = (".git/*", "*/.git/*", ".hg/*", "*/.hg/*", ".svn/*", "*/.svn/*", "*.dist-info/RECORD")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
_ZIP_SUFFIXES = (".whl", ".zip", ".egg")
_SPDX = re.compile(rb"SPDX-License-Identifier:\s*([^\r\n]*)")
_SPDX_HEAD_BYTES = 4096
# What a damaged archive raises: at open, one clear error; for one member, that file counts as unreadable.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)
_READ_ERRORS = (OSError, *_ARCHIVE_ERRORS)
_METADATA_FILE = re.compile(r"[^/]+\.dist-info/METADATA|[^/]+/PKG-INFO|PKG-INFO")
_LICENCE_FILE = re.compile(r"(?:COPYING|LICEN[CS]E)(?:\.[A-Za-z]+)?")
# Skip reasons, in the order the summary lists them.
BINARY, NOT_UTF8, UNREADABLE, EMPTY, TOO_SMALL, TOO_LARGE, EXCLUDED, DUPLICATE, NOT_A_FILE = (
    "binary (NUL byte)", "not UTF-8", "unreadable", "empty or whitespace only", "below --min-bytes",
    "above --max-bytes", "excluded by the globs", "duplicate content (kept once)", "not a regular file")


@dataclass(frozen=True)
class SourceCorpusConfig:
    output: Path
    inputs: tuple[Path, ...] = ()  # directories and archives
    packages: tuple[str, ...] = ()  # installed distributions, by name
    name: str = "corpus"  # file prefix: <name>.index.jsonl, <name>.validation.jsonl, <name>.test.jsonl
    include: tuple[str, ...] = ()  # globs on the path inside the source; none: every file
    exclude: tuple[str, ...] = DEFAULT_EXCLUDES
    min_bytes: int = 1
    max_bytes: int = 1 << 20
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if not self.inputs and not self.packages:
            raise ValueError("no input: give directories, archives or --package NAME")
        if not 0 <= self.min_bytes <= self.max_bytes:
            raise ValueError(f"need 0 <= --min-bytes <= --max-bytes, got {self.min_bytes} and {self.max_bytes}")
        fractions = (self.validation_fraction, self.test_fraction)
        if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
            raise ValueError(f"validation and test fractions must lie in [0, 1) and leave room for the index, got "
                             f"{self.validation_fraction} and {self.test_fraction}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"--name {self.name!r}: use letters, digits, '_', '.' and '-' only")


@dataclass
class Source:
    """One input: its name, version and declared licence, and its files in a fixed order."""

    label: str  # the input as given, for messages
    name: str
    version: str | None
    license: str | None
    # (path, size, read) in a fixed order; size and read None: not a regular file. The size comes
    # first so that excluded and oversized files are never read.
    files: Callable[[], Iterator[tuple[str, Callable[[], int] | None, Callable[[], bytes] | None]]]
    tree_license: str | None = None  # the SPDX identifier of a top-level COPYING / LICENSE file


@dataclass
class SourceStats:
    label: str
    name: str
    version: str | None
    license: str | None
    tree_license: str | None
    kept: Counter = field(default_factory=Counter)  # per split
    skipped: Counter = field(default_factory=Counter)  # per reason


def split_of(path: str, validation_fraction: float, test_fraction: float) -> str:
    """index, validation or test, from a hash of the path alone."""
    u = int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "index"


def set_name_of(path: str) -> str:
    return PROSE_SETS.get(PurePosixPath(path).suffix.lower(), "Github")


def declared_license(metadata) -> str | None:
    """A distribution's licence: License-Expression, else a one-line License, else classifiers."""
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        return expression
    text = (metadata.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 100 and text.upper() != "UNKNOWN":
        return text
    classifiers = [c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or []
                   if c.startswith("License ::")]
    return "; ".join(classifiers) or None


def file_license(data: bytes) -> str | None:
    """The ``SPDX-License-Identifier`` near the top of a file, without comment closers."""
    found = _SPDX.search(data[:_SPDX_HEAD_BYTES])
    if not found:
        return None
    value = found.group(1).decode("utf-8", "replace").strip()
    for closer in ("*/", "-->", "#}"):
        value = value.removesuffix(closer).strip()
    return value or None


def _parse_metadata(raw: bytes):
    return email.parser.BytesParser().parsebytes(raw, headersonly=True)


def _strip_common_root(names: list[str]) -> str:
    """The top directory under which every member lies ('' when there is none)."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names if n.strip("/") != next(iter(tops))):
        return next(iter(tops)) + "/"
    return ""


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in _TAR_SUFFIXES + _ZIP_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _named(stem: str, metadata) -> tuple[str, str | None, str | None]:
    if metadata is None:
        return stem, None, None
    return metadata.get("Name") or stem, metadata.get("Version"), declared_license(metadata)


def directory_source(path: Path, output: Path | None = None) -> Source:
    """A tree's files; ``output``, the corpus being written, is left out where it lies inside
    the tree (``ttt-index corpus . --out corpus``), its scratch siblings too."""
    meta_files = sorted([*path.glob("PKG-INFO"), *path.glob("*.dist-info/METADATA"), *path.glob("*.egg-info/PKG-INFO")])
    metadata = _parse_metadata(meta_files[0].read_bytes()) if meta_files else None
    own = _output_within(path, output)

    def files():
        for item in sorted(path.rglob("*")):
            rel = item.relative_to(path)
            if (item.is_dir() and not item.is_symlink()) or (own and _is_under_output(rel, *own)):
                continue
            if item.is_file() and not item.is_symlink():
                yield rel.as_posix(), (lambda item=item: item.stat().st_size), item.read_bytes
            else:
                yield rel.as_posix(), None, None

    licence_files = sorted(p for p in path.iterdir() if p.is_file() and _LICENCE_FILE.fullmatch(p.name))
    tree = next(filter(None, (file_license(p.read_bytes()) for p in licence_files)), None)
    return Source(str(path), *_named(path.resolve().name, metadata), files, tree)  # "." has no name


def _output_within(tree: Path, output: Path | None) -> tuple[tuple[str, ...], Path] | None:
    """Where ``output`` would lie inside ``tree``: its parent's path parts relative to the tree."""
    if output is None:
        return None
    try:
        return Path(output).resolve().parent.relative_to(tree.resolve()).parts, Path(output)
    except ValueError:
        return None


def _is_under_output(rel: Path, parent_parts: tuple[str, ...], output: Path) -> bool:
    n = len(parent_parts)
    return len(rel.parts) > n and rel.parts[:n] == parent_parts and names_output(rel.parts[n], output)


def zip_source(path: Path) -> Source:
    with zipfile.ZipFile(path) as z:
        infos = sorted((i for i in z.infolist() if not i.is_dir()), key=lambda i: i.filename)
        meta_names = sorted(i.filename for i in infos if _METADATA_FILE.fullmatch(i.filename))
        metadata = _parse_metadata(z.read(meta_names[0])) if meta_names else None
        root = _strip_common_root([i.filename for i in infos]) if not path.name.endswith(".whl") else ""
        tree = next(filter(None, (file_license(z.read(i)) for i in infos
                                  if _LICENCE_FILE.fullmatch(i.filename.removeprefix(root)))), None)

    def files():
        with zipfile.ZipFile(path) as z:
            for info in infos:
                name = info.filename.removeprefix(root)
                yield name, (lambda info=info: info.file_size), (lambda info=info: z.read(info))

    return Source(str(path), *_named(_archive_stem(path), metadata), files, tree)


def tar_source(path: Path) -> Source:
    # One streaming pass for the member names and the metadata (a tarball cannot be read out
    # of order cheaply: seeking back in a compressed stream decompresses it again).
    names, metadata, licences = [], None, {}
    with tarfile.open(path, mode="r|*") as t:
        for member in t:
            names.append(member.name)
            if not member.isfile() or member.name.count("/") > 1:
                continue
            if re.fullmatch(r"(?:[^/]+/)?PKG-INFO", member.name) and metadata is None:
                metadata = _parse_metadata(t.extractfile(member).read())
            elif _LICENCE_FILE.fullmatch(member.name.rsplit("/", 1)[-1]):
                licences[member.name] = file_license(t.extractfile(member).read())
    root = _strip_common_root([n for n in names if n.strip("/")])
    tree = next((v for k, v in sorted(licences.items()) if v and "/" not in k.removeprefix(root)), None)

    def files():
        with tarfile.open(path, mode="r|*") as t:
            for member in t:
                if member.isdir():
                    continue
                rel = member.name.removeprefix(root)
                if member.isfile():
                    yield rel, (lambda member=member: member.size), lambda member=member: t.extractfile(member).read()
                else:
                    yield rel, None, None

    return Source(str(path), *_named(_archive_stem(path), metadata), files, tree)


def package_source(name: str) -> Source:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"--package {name}: no installed distribution of that name in this Python") from None
    inside = sorted(str(f) for f in dist.files or () if not str(f).startswith(".."))

    def files():
        for rel in inside:
            located = Path(dist.locate_file(rel))
            if located.is_file():
                yield rel, (lambda located=located: located.stat().st_size), located.read_bytes
            else:
                yield rel, None, None

    return Source(f"--package {name}", *_named(name, dist.metadata), files)


def open_source(path: Path, output: Path | None = None) -> Source:
    """The source an input path names (``output``: the corpus being written, never read from a
    tree that holds it); errors before any work for what cannot be read."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory or archive")
    if path.is_dir():
        return directory_source(path, output)
    reader = (zip_source if path.name.endswith(_ZIP_SUFFIXES) else
              tar_source if path.name.endswith(_TAR_SUFFIXES) else None)
    if reader is None:
        raise ValueError(f"{path}: not a directory or an archive this reads (a wheel, .zip, .tar, .tar.gz, .tar.xz, "
                         f".tar.bz2)")
    try:
        return reader(path)
    except _ARCHIVE_ERRORS as e:
        raise ValueError(f"{path}: not a readable archive ({e})") from e


def _skip_before_reading(path: str, size: Callable[[], int] | None, config: SourceCorpusConfig) -> str | None:
    if config.include and not any(fnmatch.fnmatchcase(path, g) for g in config.include):
        return EXCLUDED
    if any(fnmatch.fnmatchcase(path, g) for g in config.exclude):
        return EXCLUDED
    return NOT_A_FILE if size is None else _size_reason(size(), config)


def _size_reason(size: int, config: SourceCorpusConfig) -> str | None:
    if size > config.max_bytes:
        return TOO_LARGE
    if size < config.min_bytes:
        return TOO_SMALL
    return None


def _content_reason(data: bytes, config: SourceCorpusConfig) -> tuple[str | None, str | None]:
    """(skip reason, text): the size again (a file may change between stat and read), then the bytes."""
    reason = _size_reason(len(data), config) or (BINARY if b"\x00" in data else None)
    if reason is not None:
        return reason, None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return NOT_UTF8, None
    return (EMPTY, None) if not text.strip() else (None, text)


def documents(source: Source, config: SourceCorpusConfig, seen: set[bytes], stats: SourceStats
              ) -> Iterator[tuple[str, dict]]:
    """(split, record) of every kept file of one source, counting what is skipped."""
    for path, size, read in source.files():
        try:
            reason = _skip_before_reading(path, size, config)
            if reason is None:
                reason, text = _content_reason(data := read(), config)
        except _READ_ERRORS:
            stats.skipped[UNREADABLE] += 1
            continue
        if reason is None:
            digest = hashlib.sha256(data).digest()
            if digest in seen:
                reason = DUPLICATE
            seen.add(digest)
        if reason is not None:
            stats.skipped[reason] += 1
            continue
        meta = {"pile_set_name": set_name_of(path), "path": path, "source": source.name}
        if source.version:
            meta["version"] = source.version
        licence = source.license or file_license(data) or source.tree_license
        if licence:
            meta["license"] = licence
        meta["sha256"] = digest.hex()
        split = split_of(path, config.validation_fraction, config.test_fraction)
        stats.kept[split] += 1
        yield split, {"text": text, "meta": meta}


def _is_corpus_output(directory: Path) -> bool:
    try:
        return json.loads((directory / SUMMARY_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_source_corpus(config: SourceCorpusConfig) -> dict:
    """Write the corpus; returns the summary (also written as ``summary.json``)."""
    sources = [open_source(Path(p), config.output) for p in config.inputs]
    sources += [package_source(n) for n in config.packages]
    seen: set[bytes] = set()
    all_stats = []
    with atomic_output(config.output, config.overwrite, is_ours=_is_corpus_output,
                       inputs=[Path(p) for p in config.inputs]) as scratch:
        handles = {s: open(scratch / f"{config.name}.{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        try:
            for source in sources:
                stats = SourceStats(source.label, source.name, source.version, source.license, source.tree_license)
                all_stats.append(stats)
                with tqdm(desc=f"corpus {source.name}", unit=" files", disable=not config.progress) as bar:
                    for split, record in documents(source, config, seen, stats):
                        handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                        bar.update(1)
        finally:
            for handle in handles.values():
                handle.close()
        total = Counter()
        for stats in all_stats:
            total.update(stats.kept)
        if not sum(total.values()):
            skipped = Counter()
            for stats in all_stats:
                skipped.update(stats.skipped)
            raise ValueError(f"no document in {', '.join(s.label for s in all_stats)}: every file was skipped "
                             f"({_describe(skipped) or 'no files'})")
        summary = {"format": FORMAT, "config": _config_json(config), "documents": dict(total),
                   "files": {s: f"{config.name}.{s}.jsonl" for s in SPLITS},
                   "sources": [{**asdict(s), "kept": dict(s.kept), "skipped": dict(s.skipped)} for s in all_stats]}
        (scratch / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _config_json(config: SourceCorpusConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
            for k, v in asdict(config).items() if k not in ("overwrite", "progress")}


def _describe(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def summary_lines(summary: dict) -> list[str]:
    """What ``ttt-index corpus`` prints: per source and in total, kept and skipped by reason."""
    lines = []
    for s in summary["sources"]:
        version = f" {s['version']}" if s["version"] else ""
        licence = s["license"] or s["tree_license"]
        licence = f" ({licence})" if licence else ""
        kept = sum(s["kept"].values())
        lines.append(f"{s['name']}{version}{licence}: {kept} documents" +
                     (f"; skipped {_describe(Counter(s['skipped']))}" if s["skipped"] else ""))
    d = summary["documents"]
    lines.append(f"total: {sum(d.values())} documents: {d.get('index', 0)} index, {d.get('validation', 0)} validation, "
                 f"{d.get('test', 0)} test")
    return lines
