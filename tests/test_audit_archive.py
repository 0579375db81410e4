"""The audit archive: with a 1-day hot window, older sealed entries move out of Redis into
segment files with signed tree heads; the chain continues across them; `intake audit verify`
(online, with the audit key) and `--offline` (the public key alone, no Redis) both pass, and
each rejects a changed byte, a dropped segment, a reordered segment and a tree head signed by
another key."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intake.audit import archive as archive_mod
from intake.audit.archive import Archive, LocalDir, TreeHead
from intake.audit.ledger import Ledger
from intake.core.errors import AuditBroken
from tests.factories import draft
from tests.workers.harness import Rig, rig  # noqa: F401

DAY = 86400.0


def offline(directory: Path, pem: Path) -> subprocess.CompletedProcess[str]:
    """`intake audit verify --offline` with no broker settings at all (no Redis, no audit key)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env["INTAKE_DATA_DIR"] = str(directory.parent / "nowhere")
    return subprocess.run([sys.executable, "-m", "intake", "audit", "verify", "--offline", str(directory),
                           "--public-key", str(pem)], env=env, capture_output=True, text=True, timeout=60)


def online(rig: Rig, directory: Path) -> None:
    rig.broker.audit.archive = Archive(LocalDir(directory))
    rig.broker.audit.verify(rig.broker.keyring.keys)


@pytest.fixture
def archived(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> tuple[Rig, Path, int]:
    monkeypatch.setattr(archive_mod, "SEGMENT_MAX", 40)  # several segments from a small log
    directory = rig.tmp / "audit-archive"
    rig.broker.settings = rig.settings = rig.settings.model_copy(update={"audit_hot": DAY})  # INTAKE_AUDIT_HOT=86400
    rig.broker.audit.archive = Archive(LocalDir(directory))
    rig.promote()
    for _ in range(150):
        rig.store.capture(draft())
    rig.broker.audit.seal_pending()
    assert rig.broker.ledger.follow().snapshot_if_due(every=1)
    for _ in range(10):  # the hot part: after the snapshot
        rig.store.capture(draft())
    rig.broker.audit.seal_pending()
    total = rig.broker.audit.verify().events
    return rig, directory, total


def test_entries_older_than_the_hot_window_leave_redis_and_everything_still_verifies(
        archived: tuple[Rig, Path, int]) -> None:
    rig, directory, total = archived
    r, audit = rig.r, rig.broker.audit
    before_len, before_mem = r.xlen(audit.stream), r.memory_usage(audit.stream)
    assert rig.broker.archive_due() == 0  # nothing is older than a day yet (and no lease)
    assert audit.lease.acquire() is not None  # the sealer lease holder archives
    assert rig.broker.archive_due() == 0
    moved = rig.broker.archive_due(now=time.time() + 2 * DAY)
    snap = rig.broker.ledger.snapshot_at
    assert snap is not None and moved == snap.seq - 1  # everything before the snapshot's anchor
    segments = Archive(LocalDir(directory)).segments()
    assert len(segments) >= 3 and segments[0][0] == 1 and segments[-1][1] == moved
    assert r.xlen(audit.stream) == before_len - moved
    assert r.hlen(audit.seals) == r.xlen(audit.stream)
    assert r.memory_usage(audit.stream) < before_mem / 3  # Redis holds the hot window only
    report = audit.verify(rig.broker.keyring.keys)  # online: the chain across segments, then Redis
    assert report.events == total and not [a for a in report.anomalies if a.fatal]
    full = Ledger(audit)
    full._loaded = True  # a start with no snapshot replays the archive, then Redis
    assert full.follow().halted is None and full._state() == rig.broker.ledger.follow()._state()
    done = offline(directory, rig.settings.keys["public"])
    assert done.returncode == 0, done.stderr
    assert f"archive intact: {moved} entries in {len(segments)} segments" in done.stdout
    # A second run has nothing to move; a later one continues the chain and the tree.
    assert rig.broker.archive_due(now=time.time() + 2 * DAY) == 0
    assert audit.verify(rig.broker.keyring.keys).events == total


def tamper_cases(directory: Path, pem_dir: Path) -> dict[str, Path]:
    """One copy of the archive per attack."""
    cases = {}
    segs = sorted(p for p in directory.iterdir() if p.name.startswith("seg-"))
    heads = sorted(p for p in directory.iterdir() if p.name.startswith("sth-"))

    def copy(name: str) -> Path:
        target = pem_dir / name
        shutil.copytree(directory, target, ignore=shutil.ignore_patterns(".lock"))
        cases[name] = target
        return target

    changed = copy("changed-byte") / segs[1].name
    raw = bytearray(changed.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    changed.write_bytes(bytes(raw))

    (copy("dropped") / segs[1].name).unlink()

    reordered = copy("reordered")
    a, b = (reordered / segs[0].name).read_bytes(), (reordered / segs[1].name).read_bytes()
    (reordered / segs[0].name).write_bytes(b)
    (reordered / segs[1].name).write_bytes(a)

    # A tree head re-signed by another key, under the broker's key id and under its own.
    for name, keep_kid in (("other-key", True), ("other-kid", False)):
        target = copy(name) / heads[-1].name
        sth = TreeHead.decode(target.read_bytes())
        other = Ed25519PrivateKey.generate()
        forged = TreeHead(**{**sth.__dict__, "kid": sth.kid if keep_kid else "0" * 16})
        forged = TreeHead(**{**forged.__dict__, "sig": other.sign(forged.body())})
        target.write_bytes(forged.encode())
    # An entry rewritten inside a segment that still decompresses (the gzip re-made).
    rewritten = copy("rewritten") / segs[0].name
    original = gzip.decompress(rewritten.read_bytes())
    text = original.replace(b'cli:root', b'cli:eve!', 1)
    assert text != original
    rewritten.write_bytes(gzip.compress(text))
    return cases


def test_each_tampered_archive_is_rejected_online_and_offline(archived: tuple[Rig, Path, int], tmp_path: Path) -> None:
    rig, directory, _ = archived
    assert rig.broker.audit.lease.acquire() is not None
    assert rig.broker.archive_due(now=time.time() + 2 * DAY) > 0
    pem = rig.settings.keys["public"]
    for name, copy in tamper_cases(directory, tmp_path).items():
        done = offline(copy, pem)
        assert done.returncode == 1 and "BROKEN" in done.stdout, (name, done.stdout, done.stderr)
        with pytest.raises(AuditBroken):
            online(rig, copy)
    # Signed by another key than the one given: the real archive fails against a stranger's key.
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert offline(directory, stranger).returncode == 1
    assert offline(directory, pem).returncode == 0
    online(rig, directory)  # the untouched archive still verifies


def test_export_is_the_whole_chain_archived_segments_first(archived: tuple[Rig, Path, int], tmp_path: Path) -> None:
    """`intake audit export` on a log with a 1-day hot window: the entries aged into segments
    come first, then Redis's, exactly as the export before archiving listed them."""
    import json

    from click.testing import CliRunner

    from intake.cli.main import cli
    from tests.api_harness import link_os_user, running_broker

    rig, directory, total = archived
    audit = rig.broker.audit
    before = list(audit.export())
    assert [e["seq"] for e in before] == list(range(1, total + 1)) and all(e["verified"] for e in before)
    assert audit.lease.acquire() is not None
    moved = rig.broker.archive_due(now=time.time() + 2 * DAY)
    audit.lease.release()
    assert moved > 0 and rig.r.xlen(audit.stream) == total - moved  # most of it is only in segments now
    assert list(audit.export()) == before

    link_os_user(rig.settings)
    settings = rig.settings.model_copy(update={"audit_archive": directory})
    with running_broker(settings) as running:
        out = tmp_path / "export.jsonl"
        done = CliRunner().invoke(cli, ["audit", "export", "-o", str(out)],
                                  env=rig.env(INTAKE_URL=running.socket_url), catch_exceptions=False)
        assert done.exit_code == 0, done.output
        exported = [json.loads(line) for line in out.read_text().splitlines()]
        assert exported[:total] == [json.loads(json.dumps(e)) for e in before]
        assert [e["seq"] for e in exported] == list(range(1, len(exported) + 1))  # sealed on, no gap

        # A segment gone from the archive: the export fails rather than leave history out.
        segments = Archive(LocalDir(directory)).segments()
        (directory / segments[1][2]).unlink()
        with pytest.raises(AuditBroken, match="segment"):
            list(audit.export())
        done = CliRunner().invoke(cli, ["audit", "export", "-o", str(out)], env=rig.env(INTAKE_URL=running.socket_url))
        assert done.exit_code != 0 and done.output.count("\n") == 1 and "a segment is missing" in done.output


def test_the_replay_index_holds_the_hot_window_and_copies_of_archived_entries_are_refused(
        archived: tuple[Rig, Path, int]) -> None:
    """`intake:audit:uids` loses the archived entries' uids with them; a Redis writer who
    replays an archived entry verbatim (and wipes the index for good measure) still gets it
    sealed as not genuine (stale: stamped before the archive's boundary), while a fresh event
    is sealed ok and a copy of a hot one is still a replay."""
    import json

    import redis

    from intake.audit.log import OK, REPLAY, STALE, entry_uid

    rig, directory, total = archived
    audit, r = rig.broker.audit, rig.r
    audit.hot_s = DAY
    assert r.hlen(audit.uids) > 150  # every genuine entry so far
    assert audit.archive_boundary() is None  # nothing archived: no time rule at all
    assert audit.lease.acquire() is not None
    moved = rig.broker.archive_due(now=time.time() + 2 * DAY)
    audit.lease.release()
    hot_uids = {entry_uid(f) for _, f in r.xrange(audit.stream)} - {""}
    assert r.hlen(audit.uids) == len(hot_uids) <= r.xlen(audit.stream) == total - moved  # the hot window only
    assert set(r.hkeys(audit.uids)) == hot_uids

    # Two days on (the broker's clock; Redis's stream ids are what the archive went by).
    rig.clock.advance(2 * DAY)
    rig.store.capture(draft())
    audit.seal_pending()
    fresh_id, fresh = r.xrevrange(audit.stream, "+", "-", count=1)[0]
    assert r.hget(audit.seals, fresh_id).split(" ")[2] == OK

    segment = Archive(LocalDir(directory)).segments()[0][2]
    archived_line = json.loads(gzip.decompress((directory / segment).read_bytes()).splitlines()[5])
    assert archived_line["verdict"] == OK and entry_uid(archived_line["f"])
    attacker = redis.Redis.from_url(rig.settings.redis_url.get_secret_value(), decode_responses=True)  # a plain client
    hot_copy = attacker.xadd(audit.stream, fresh)  # a copy of a hot entry: the index knows it
    audit.seal_pending()
    assert r.hget(audit.seals, hot_copy).split(" ")[2] == REPLAY
    attacker.delete(audit.uids)  # the time rule does not depend on anything in Redis
    old_copy = attacker.xadd(audit.stream, archived_line["f"])
    rig.store.capture(draft())
    audit.seal_pending()
    verdicts = [r.hget(audit.seals, sid).split(" ")[2] for sid, _ in r.xrange(audit.stream, old_copy, "+")]
    assert verdicts == [STALE, OK]  # the archived entry's copy, the new capture
    report = audit.verify(rig.broker.keyring.keys)  # not a break in sealed history
    assert {a.id for a in report.anomalies} >= {old_copy} and not [a for a in report.anomalies if a.fatal]
    assert rig.broker.ledger.follow().halted is None


class InMemoryStore:
    """A second :class:`~intake.audit.archive.SegmentStore` (objects in a dict, as a bucket
    would hold them): the archiver and both verifies work through the four calls alone."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self.objects)

    def read(self, name: str) -> bytes:
        try:
            return self.objects[name]
        except KeyError:
            raise FileNotFoundError(name) from None

    def create(self, name: str, data: bytes) -> None:
        if name in self.objects:
            raise FileExistsError(name)
        self.objects[name] = bytes(data)

    def locked(self):  # type: ignore[no-untyped-def]
        return self.lock


def test_the_archive_goes_through_the_segment_store_interface_alone(archived: tuple[Rig, Path, int]) -> None:
    from intake.audit.archive import SegmentStore, verify_offline

    rig, directory, total = archived
    store: SegmentStore = InMemoryStore()
    rig.broker.audit.archive = Archive(store)
    assert rig.broker.audit.lease.acquire() is not None
    moved = rig.broker.archive_due(now=time.time() + 2 * DAY)
    assert moved > 0 and not directory.exists()  # nothing reached around the interface
    names = store.names()
    assert names and all(n.startswith(("seg-", "sth-")) for n in names)
    assert rig.broker.audit.verify(rig.broker.keyring.keys).events == total  # online, through the store
    report = verify_offline(store, rig.broker.keyring.keys)  # offline, through the store
    assert report.problems == () and report.entries == moved
    assert [e["seq"] for e in rig.broker.audit.export()] == list(range(1, total + 1))
    with pytest.raises(FileExistsError):  # create-only: the archiver never rewrites
        store.create(names[0], b"x")
    del store.objects[names[0]]  # type: ignore[attr-defined]
    assert verify_offline(store, rig.broker.keyring.keys).problems
