"""The README and the docs/ pages stay honest where a test can tell: the argument table is
settings.py's, links and named files exist, commands name real subcommands and flags, and
every experiment file (the README's example included) passes the checks `ttt-nn compare` runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lm_eval_ttt.experiment import load

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readme_argument_table_is_the_one_settings_makes():
    from lm_eval_ttt.settings import arguments_table

    assert arguments_table() in (REPO / "README.md").read_text(), "regenerate it with `ttt-nn arguments`"


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in PAGES:
        assert "{{" not in page.read_text(), f"{page.name}: a placeholder was left"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_named_files_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (page.parent / target).exists(), f"{page.name}: link to {target}"
    for named in re.findall(r"`((?:docs|benchmarks|task_configs|tests|lm_eval_ttt|index_server)/[\w./-]+)`", text):
        if "*" not in named and "<" not in named:
            assert (REPO / named).exists(), f"{page.name}: names {named}"


def _commands(text: str) -> list[list[str]]:
    """The ttt-nn / ttt-index command lines of a page's code blocks (continuations joined)."""
    out = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            match = re.match(r"(?:\.venv/bin/)?(ttt-nn|ttt-index) (.*)", line)
            if match and "<" not in line and "$" not in line:  # placeholders and shell variables: not parsed
                out.append([match.group(1), *shlex.split(match.group(2))])
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_name_real_subcommands_and_flags(page):
    from index_server.cli import build_parser as index_parser
    from lm_eval_ttt.cli import build_parser as nn_parser

    for command in _commands(page.read_text()):
        parser = {"ttt-nn": nn_parser, "ttt-index": index_parser}[command[0]]()
        try:
            parser.parse_args(command[1:])
        except SystemExit as e:
            raise AssertionError(f"{page.name}: {' '.join(command)} does not parse") from e


def test_every_experiment_file_passes_the_checks_compare_runs():
    files = sorted((REPO / "docs" / "experiments").glob("*.toml"))
    assert {f.stem for f in files} >= {"bundled", "scale", "select", "defaults"}
    for file in files:
        experiment = load(file, check_paths=False)
        assert experiment.methods


def test_the_readme_example_experiment_passes_the_checks(tmp_path):
    readme = (REPO / "README.md").read_text()
    (example,) = re.findall(r"cat > work/mine/compare.toml <<'EOF'\n(.*?)\nEOF", readme, re.S)
    path = tmp_path / "compare.toml"
    path.write_text(example)
    experiment = load(path, check_paths=False)
    assert [m.label for m in experiment.methods] == ["hf", "dyneval", "nearest"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_toml_block_of_a_page_passes_the_checks(page, tmp_path):
    for n, block in enumerate(re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)):
        path = tmp_path / f"{page.stem}-{n}.toml"
        path.write_text(block)
        assert load(path, check_paths=False).methods
