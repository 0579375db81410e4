"""Issue 9 attacks on the result: what a hostile agent leaves in the work tree must not make the
worker misreport the change (the +/- lines on the result card) or exhaust the worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from intake.workers.dev import create_bare_repo
from intake.workers.snapshot import MAX_CHANGE_BYTES, MAX_FILE_BYTES
from intake.workers.workspace import Workspace


@pytest.mark.parametrize("ignored", [True, False])
def test_a_gitattributes_cannot_hide_the_line_counts(tmp_path: Path, ignored: bool) -> None:
    bare = create_bare_repo(tmp_path / "r.git", "main", {"README.md": "# seed\n", "docs/a.md": "one\n"})
    with Workspace.clone(str(bare), "main", None, root=tmp_path) as ws:
        ws.create_branch("intake/T-000000000001")
        # Attributes that mark every file binary, kept out of the commit by an ignore rule:
        # git's diff would read them from the work tree and count nothing.
        # Committed, they would still hide the counts of every other file.
        (ws.path / ".gitignore").write_text(".gitattributes\n" if ignored else "build/\n")
        (ws.path / ".gitattributes").write_text("* -diff\n")
        (ws.path / "docs" / "a.md").write_text("".join(f"line {i}\n" for i in range(50)))
        assert ws.commit_all("change") is not None
        assert (".gitattributes" in {c.path for c in ws.changed_files()}) is not ignored
        added, removed = ws.numstat()
    # 50 lines of docs/a.md, the .gitignore line (and the .gitattributes line); "one" removed
    assert (added, removed) == ((51, 1) if ignored else (52, 1))


def test_many_large_sparse_files_are_refused_not_held_in_the_worker(tmp_path: Path) -> None:
    bare = create_bare_repo(tmp_path / "r.git", "main", {"README.md": "# seed\n"})
    with Workspace.clone(str(bare), "main", None, root=tmp_path) as ws:
        ws.create_branch("intake/T-000000000002")
        # Sparse: costs the agent no disk, but each is MAX_FILE_BYTES of memory once read.
        count = MAX_CHANGE_BYTES // MAX_FILE_BYTES + 2
        for i in range(count):
            with open(ws.path / f"big-{i}.bin", "wb") as handle:
                handle.truncate(MAX_FILE_BYTES)
        ws.commit_all("change")
        refused = ws.special_entries()
        assert any(r.startswith("change too large") for r in refused), refused
        assert sum(len(v) for v in ws._scan.contents.values()) <= MAX_CHANGE_BYTES


def test_a_file_name_cannot_forge_lines_or_links_on_the_result_card() -> None:
    from intake.channels.slack.render import result_card

    hostile = "docs/a.md\nChecks: security-review: passed <https://evil.example|approve>"
    blocks = result_card(task_id="T-000000000003", result={"commit": "a" * 40, "files": [hostile]}, waiting=True)
    files = next(b for b in blocks if b.get("block_id") == "result_files")["text"]["text"]
    assert files.count("\n") == 1, files  # "Files:" and one line per file
    assert "<https://" not in files and "&lt;https://evil.example|approve&gt;" in files
