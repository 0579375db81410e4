"""The documentation: `mkdocs build --strict` passes (no broken link, page or anchor) and fails
when one is planted; the threat model names each of the design's ten trust boundaries with tests
that exist; the licence matches pyproject; both quick starts are the same two commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
#: The design notes' ten trust boundaries (DESIGN.md, "Trust boundaries"), in order.
BOUNDARIES = (
    "Channels are untrusted", "An idea is inert", "Promotion is the only door", "Approve a hash",
    "The broker is the only minter", "Redis is storage, not authority",
    "Agents are contained; workers hold least privilege", "Revocation wins", "Everything is on the record",
    "One person, one identity",
)
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "-d", str(site)], capture_output=True, text=True, timeout=180)


def test_the_docs_build_strictly_with_no_broken_link(tmp_path: Path) -> None:
    done = _build(REPO_ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr
    built = {p.name for p in (tmp_path / "site").glob("*.html")}
    for page in ("index.html", "concepts.html", "policy.html", "channels.html", "deploy.html", "operations.html",
                 "configuration.html", "cli.html", "threat-model.html"):
        assert page in built, page


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO_ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    for planted in ("[gone](no-such-page.md)", "[gone](concepts.md#no-such-anchor)"):
        page = tmp_path / "docs" / "operations.md"
        page.write_text((DOCS / "operations.md").read_text() + f"\n{planted}\n")
        done = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
        assert done.returncode != 0, planted
        assert planted.split("(")[1].rstrip(")").split("#")[-1] in done.stderr, done.stderr


def _design_boundaries() -> list[str] | None:
    """The boundary titles from DESIGN.md when it is beside the repository (a clone alone has not)."""
    for design in (REPO_ROOT.parent / "shared" / "DESIGN.md", REPO_ROOT.parents[1] / "shared" / "DESIGN.md"):
        if design.is_file():
            section = design.read_text().split("## Trust boundaries", 1)[1].split("\n## ", 1)[0]
            return re.findall(r"^\d+\. \*\*(.+?)\.\*\*", section, flags=re.M)
    return None


def test_the_threat_model_names_each_boundary_with_tests_that_exist() -> None:
    from_design = _design_boundaries()
    if from_design is not None:
        assert tuple(from_design) == BOUNDARIES, from_design
    text = (DOCS / "threat-model.md").read_text()
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    titled = {s.split("\n", 1)[0]: s for s in sections}
    for n, name in enumerate(BOUNDARIES, 1):
        heading = f"{n}. {name}"
        assert heading in titled, f"the threat model has no section '### {heading}'"
        body = titled[heading]
        for part in ("**Assets:**", "**Actors:**", "**Controls:**", "**Stops:**", "**Does not stop:**"):
            assert part in body, f"{heading}: no {part}"
        assert TEST_REF.search(body), f"{heading}: no test proves it"


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")) + ["../SECURITY.md", "../README.md"])
def test_every_test_a_doc_cites_exists(doc: str) -> None:
    text = (DOCS / doc).read_text()
    for path in re.findall(r"`((?:tests|bench)/[\w/]+\.py)(?:::\w+)?`", text):
        assert (REPO_ROOT / path).is_file(), f"{doc}: {path} does not exist"
    for path, name in TEST_REF.findall(text):
        source = REPO_ROOT / path
        assert source.is_file(), f"{doc}: {path} does not exist"
        assert re.search(rf"^(async )?def {name}\(", source.read_text(), flags=re.M), f"{doc}: {path}::{name}"


def test_the_licence_file_is_the_one_pyproject_names() -> None:
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text, "the full text, not a stub"
    assert (REPO_ROOT / "SECURITY.md").is_file()


def _quick_start(text: str, heading: str) -> list[str]:
    """The command blocks of the section, up to the walk-through that follows the two commands."""
    section = text.split(heading, 1)[1].split("\n#", 1)[0].split("While it runs", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)]


def test_the_quick_start_is_exactly_two_commands_in_both_readmes() -> None:
    readme = _quick_start((REPO_ROOT / "README.md").read_text(), "## Quick start")
    docs = _quick_start((DOCS / "README.md").read_text(), "## Two commands")
    assert len(readme) == 2 and all("\n" not in block for block in readme), readme
    assert docs == readme
