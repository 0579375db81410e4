"""Tree records, blob ids and diffs (workers/snapshot.py), checked against real git."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from intake.workers.snapshot import ChangedFile, Entry, SnapshotError, blob_id, diff, verified_blob


@pytest.mark.parametrize("object_format", ["sha1", "sha256"])
def test_blob_id_is_gits(tmp_path: Path, object_format: str) -> None:
    subprocess.run(["git", "init", "-q", f"--object-format={object_format}", str(tmp_path)], check=True)
    data = b"requests==2.32.0\n\0binary\n"
    out = subprocess.run(["git", "-C", str(tmp_path), "hash-object", "--stdin"], input=data,
                         capture_output=True, check=True).stdout.decode().strip()
    assert blob_id(data, object_format) == out
    assert verified_blob(data, out, object_format) == data
    with pytest.raises(SnapshotError, match="tampered"):
        verified_blob(data + b"x", out, object_format)


def test_diff_pairs_exact_renames_and_sees_mode_changes() -> None:
    a, b = Entry("100644", "a" * 40), Entry("100644", "b" * 40)
    base = {"old.md": a, "keep.py": b, "gone.txt": Entry("100644", "c" * 40), "run.sh": b}
    head = {"new/old.md": a, "keep.py": b, "run.sh": Entry("100755", "b" * 40), "x": Entry("120000", "d" * 40)}
    assert diff(base, head) == [
        ChangedFile("gone.txt", "D"),
        ChangedFile("new/old.md", "R", "old.md"),
        ChangedFile("run.sh", "M"),
        ChangedFile("x", "A"),
    ]
