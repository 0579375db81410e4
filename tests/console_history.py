"""A history for the console's lists (issue 23): an old idea and task a day or more behind more
than 1,000 newer ideas, and tasks promoted by different approvers into different repos and tiers. Built through
the real store and Gatekeeper (real TOTP codes on a test clock), so the ledger holds it all."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyotp

from intake.core.models import Channel
from intake.runtime import Broker
from tests.conftest import FakeClock
from tests.factories import draft, previous_step_code

NEWER = 1010  # more than the old console's 1,000-record window
DAY = 86400.0


@dataclass
class History:
    old_idea: str = ""
    old_task: str = ""
    web_task: str = ""  # acme/web, standard, promoted by bob, requester cli:erin, revoked
    pay_task: str = ""  # acme/payments, privileged, promoted by carol, awaiting approvals
    newer: list[str] = field(default_factory=list)
    totps: dict[str, pyotp.TOTP] = field(default_factory=dict)
    start: float = 0.0


def enrol_all(broker: Broker, names: tuple[str, ...]) -> dict[str, pyotp.TOTP]:
    totps = {}
    for name in names:
        broker.approvers.add(broker.policy, name, name=name.title(), groups=broker.policy.groups_of(name),
                             slack_user=None, email=None, actor="cli:root")
        enrolment = broker.approvers.enrol(name, actor=f"approver:{name}")
        totps[name] = pyotp.parse_uri(enrolment.otpauth_uri)
        broker.approvers.confirm(name, previous_step_code(totps[name]), actor=f"approver:{name}")
    return totps


def build(broker: Broker, clock: FakeClock, *, newer: int = NEWER) -> History:
    """The history, from ``clock``'s now on, a day between the old records (codes are spent in
    order, so it runs forward; dave's code is left for signing in)."""
    h = History(totps=enrol_all(broker, ("alice", "bob", "carol", "dave")))
    store, gk = broker.store, broker.gatekeeper
    saved = store.clock
    store.clock = clock
    try:
        h.start = clock()
        old, _ = store.capture(draft(channel=Channel.EMAIL, requester="email:zed@example.com",
                                     text="The oldest request: rotate the zebra-needle certificate"))
        h.old_idea = old.id
        clock.advance(60)
        h.old_task = gk.promote(old.id, repo="acme/web", change_type="docs", approver_id="alice",
                                code=h.totps["alice"].at(clock())).task.id
        clock.advance(DAY)
        web, _ = store.capture(draft(channel=Channel.CLI, requester="cli:erin", text="Document the web deploy"))
        h.web_task = gk.promote(web.id, repo="acme/web", change_type="docs", approver_id="bob",
                                code=h.totps["bob"].at(clock())).task.id
        gk.revoke(h.web_task, identity="approver:bob", is_approver=True, reason="not now")
        clock.advance(DAY)
        pay, _ = store.capture(draft(channel=Channel.CLI, requester="cli:frank", text="Document the payments flow"))
        h.pay_task = gk.promote(pay.id, repo="acme/payments", change_type="docs", approver_id="carol",
                                code=h.totps["carol"].at(clock())).task.id
        clock.advance(DAY)
        for start in range(0, newer, 500):
            drafts = [draft(channel=Channel.SLACK, requester=f"slack:U0NEWER{n % 7:03d}",
                            text=f"Newer request number {n}") for n in range(start, min(newer, start + 500))]
            for result in store.capture_many(drafts):
                assert not isinstance(result, Exception), result
                h.newer.append(result[0].id)
            clock.advance(1)
        clock.advance(31)  # every approver's code step is spent
    finally:
        store.clock = saved
    broker.ledger.follow()
    return h
