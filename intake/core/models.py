"""Domain models (pydantic v2) and the lifecycle state machines from DESIGN.md.

Ideas are untrusted: their text is data and is only ever shown (escaped) or frozen into the
prompt of an approved :class:`TaskSpec`. A spec's :meth:`TaskSpec.spec_hash` is what approvals
and dispatch tokens bind to.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Channel(StrEnum):
    SLACK = "slack"
    EMAIL = "email"
    GITHUB = "github"
    GITLAB = "gitlab"
    JIRA = "jira"
    CLI = "cli"


class IdeaState(StrEnum):
    CAPTURED = "captured"
    AWAITING_APPROVAL = "awaiting_approval"
    PROMOTED = "promoted"
    DENIED = "denied"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


class TaskState(StrEnum):
    AWAITING_APPROVALS = "awaiting_approvals"
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_RESULT_APPROVAL = "awaiting_result_approval"
    DELIVERING = "delivering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    BLOCKED = "blocked"
    REVOKED = "revoked"
    EXPIRED = "expired"
    DENIED = "denied"


IDEA_PENDING = frozenset({IdeaState.CAPTURED, IdeaState.AWAITING_APPROVAL})
_IDEA_END = {IdeaState.PROMOTED, IdeaState.DENIED, IdeaState.EXPIRED, IdeaState.WITHDRAWN}
IDEA_TRANSITIONS: dict[IdeaState, frozenset[IdeaState]] = {
    IdeaState.CAPTURED: frozenset({IdeaState.AWAITING_APPROVAL, *_IDEA_END}),
    IdeaState.AWAITING_APPROVAL: frozenset(_IDEA_END),
}

TASK_OPEN = frozenset({TaskState.AWAITING_APPROVALS, TaskState.QUEUED, TaskState.RUNNING,
                       TaskState.AWAITING_RESULT_APPROVAL, TaskState.DELIVERING})
TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.AWAITING_APPROVALS: frozenset(
        {TaskState.QUEUED, TaskState.DENIED, TaskState.REVOKED, TaskState.EXPIRED}
    ),
    # queued -> awaiting_approvals is an amendment: a new spec, approvals start over.
    # queued -> failed is a worker refusing to start it (bad token, stale policy, misrouted).
    TaskState.QUEUED: frozenset(
        {
            TaskState.AWAITING_APPROVALS,
            TaskState.RUNNING,
            TaskState.FAILED,
            TaskState.DENIED,
            TaskState.REVOKED,
            TaskState.EXPIRED,
        }
    ),
    # running -> queued is a retry after an abandoned run, when policy allows one. A run that
    # passed its gates and checks has its commit quarantined on refs/intake/<task id>: it waits
    # for a result approval, or goes straight to delivery when policy needs none.
    TaskState.RUNNING: frozenset(
        {
            TaskState.AWAITING_RESULT_APPROVAL,
            TaskState.DELIVERING,
            TaskState.FAILED,
            TaskState.BLOCKED,
            TaskState.REVOKED,
            TaskState.QUEUED,
        }
    ),
    TaskState.AWAITING_RESULT_APPROVAL: frozenset(
        {TaskState.DELIVERING, TaskState.DENIED, TaskState.REVOKED}
    ),
    # delivering: a delivery job pushes the quarantined commit to the task branch and opens the
    # pull request; only then is the task succeeded.
    TaskState.DELIVERING: frozenset(
        {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.DENIED, TaskState.REVOKED}
    ),
}

_ID_RE = re.compile(r"^[IT]-[0-9a-f]{12}$")


def new_id(kind: str) -> str:
    """A fresh id such as ``I-3f9a1c2b7d0e`` (idea) or ``T-…`` (task), from a CSPRNG."""
    return f"{kind}-{secrets.token_hex(6)}"


def is_id(value: str, kind: str) -> bool:
    return bool(_ID_RE.match(value)) and value[0] == kind


# json.dumps with these arguments builds this very encoder on every call; built once it gives the
# same bytes for less (captures MAC and hash several documents each).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(data: Any) -> bytes:
    """The one canonical encoding used for hashing and signing: sorted keys, no spaces, UTF-8
    (byte for byte ``json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``)."""
    return _CANONICAL.encode(data).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IdeaDraft(_Model):
    """What a channel hands to capture after authenticating its transport.

    ``requester`` is the verified identity as ``<channel>:<platform id>`` (for Slack the user
    id, never a display name). ``delivery_id`` is the transport's id for this delivery (Slack
    event_id or trigger_id, GitHub X-GitHub-Delivery, Message-ID, …): capture is idempotent on it.
    ``raw_sha256`` is the hash of the raw transport payload, for provenance. ``filed_by`` is
    who sent the words in when that is not their author (the Slack shortcut, a forward, a CLI
    user filing for someone); empty means the requester.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: Channel
    requester: str = Field(min_length=1, max_length=200)
    filed_by: str = Field("", max_length=200)
    delivery_id: str = Field(min_length=1, max_length=256)
    text: str
    title: str = Field("", max_length=200)
    provenance: dict[str, str] = Field(default_factory=dict)
    raw_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")


class Idea(_Model):
    id: str
    channel: Channel
    requester: str  # the author of the words
    delivery_id: str
    title: str
    text: str
    provenance: dict[str, str]
    raw_sha256: str
    state: IdeaState
    created_at: float
    updated_at: float
    expires_at: float | None = None
    task_id: str | None = None
    reason: str | None = None
    # Where the idea card was posted (set by the Slack outbox): {"channel": …, "ts": …}.
    card: dict[str, str] | None = None
    escalated_at: float | None = None
    # Who sent it in (the same as requester unless a shortcut or forward); MAC-covered.
    filed_by: str = ""
    # MAC over the fields fixed at capture (see intake.audit.log.AuditLog.record_mac): the text an
    # approver freezes into a spec is the text that was captured.
    mac: str = ""


class Limits(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_timeout_s: int
    max_output_bytes: int
    max_disk_bytes: int = 1024 * 1024 * 1024
    max_processes: int = 256


class RequiredCheck(_Model):
    """A check the approved spec requires (from the policy), run by the worker on the result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    argv: tuple[str, ...]
    timeout_s: int


class TaskSpec(_Model):
    """The canonical, frozen description of one unit of agent work. Approvals bind to its hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    idea_id: str
    prompt: str
    repo: str
    base_ref: str
    change_type: str
    #: The change type's own paths (policy ``[change_types.NAME] paths``); the gates enforce
    #: them intersected with ``allowed_paths`` minus ``blocked_paths``.
    change_type_paths: tuple[str, ...]
    allowed_paths: tuple[str, ...]
    blocked_paths: tuple[str, ...]
    branch_prefix: str
    required_checks: tuple[RequiredCheck, ...]
    limits: Limits
    policy_version: str
    #: The egress allowlist (policy ``repos.egress``): where the agent may connect, through the
    #: worker's filtering proxy. Empty: no network.
    egress: tuple[str, ...] = ()

    def spec_hash(self) -> str:
        """SHA-256 over the canonical JSON of every field: any change is a new spec."""
        return sha256_hex(canonical_json(self.model_dump(mode="json")))


class Approval(_Model):
    """One approver's step-up-verified approval of one spec hash, as shown. What counts is the
    broker's ledger (its ``approval.recorded`` events, sealed), never this copy in Redis;
    ``generation`` is the approver's enrolment generation when they approved."""

    approver: str
    groups: tuple[str, ...]
    spec_hash: str
    at: float
    via: str = "cli"
    note: str = ""
    generation: int = 0
    #: For a result approval: the commit SHA approved (None for an approval of the spec).
    sha: str | None = None
    # For a result approval: the SHA-256 of the diff the approver was shown (issue 20).
    diff_sha256: str | None = None


class Task(_Model):
    id: str
    idea_id: str
    requester: str
    spec: TaskSpec
    spec_hash: str
    state: TaskState
    risk_tier: str
    required: int
    approvals: list[Approval] = Field(default_factory=list)
    created_at: float
    updated_at: float
    queue: str | None = None
    # While queued: when the approval window closes (the oldest counted approval expires).
    window_ends_at: float | None = None
    attempts: int = 0
    reason: str | None = None
    result: dict[str, Any] | None = None
    #: Approvals of the result commit (``Approval.sha``), while it awaits result approval.
    result_approvals: list[Approval] = Field(default_factory=list)


SLACK_USER_RE = r"^[UW][A-Z0-9]{8,}$"
APPROVER_ID_RE = r"^[a-z][a-z0-9_.-]{0,39}$"


class Approver(_Model):
    """A registered person who may approve, identified by immutable platform ids.

    ``secret_enc`` is the TOTP secret sealed with AES-GCM under a key outside Redis; the
    associated data binds it to ``id``, ``slack_user`` and ``generation``, so a record edited in
    Redis to point at another person, or a seed restored from an older enrolment, no longer
    decrypts.
    """

    id: str = Field(pattern=APPROVER_ID_RE)
    name: str = Field(min_length=1, max_length=100)
    groups: tuple[str, ...]
    slack_user: str | None = Field(None, pattern=SLACK_USER_RE)
    email: str | None = Field(None, max_length=254)
    secret_enc: str
    confirmed: bool = False
    created_at: float
    # Bumped by every add, reset and remove (the ledger keeps the current one): a record or
    # sealed secret restored from before a reset names an old generation and is refused.
    generation: int = 1

    def identities(self) -> frozenset[str]:
        """Every requester identity that is this person (for the no-self-approval rule)."""
        found = {f"cli:{self.id}"}
        if self.slack_user:
            found.add(f"slack:{self.slack_user}")
        if self.email:
            found.add(f"email:{self.email.lower()}")
        return frozenset(found)


class AuditEvent(_Model):
    """One record on the audit log. ``data`` holds ids and outcomes, never secrets or codes."""

    at: float
    actor: str
    action: str
    subject: str
    data: dict[str, Any] = Field(default_factory=dict)
    eid: str = ""  # unique per event, so a replayed copy is recognised
    # Set when read back from the log.
    id: str | None = None
    seq: int | None = None
