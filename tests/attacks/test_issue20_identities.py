"""Issue 20: identities that cannot be renamed or aliased. A plus-address of a linked mailbox is
that person (where the policy declares the domain subaddresses); elsewhere it is not folded.
(The renamed GitHub login: tests/functional/test_webhooks.py.)"""

from __future__ import annotations

import pytest

from intake.core.errors import Refused
from intake.core.models import Channel
from intake.core.settings import Settings
from intake.people.registry import canonical_identity
from intake.runtime import open_broker
from tests.api_harness import enrol
from tests.factories import draft


def test_canonical_identity_strips_a_subaddress_only_where_declared() -> None:
    declared = frozenset({"acme.test"})
    assert canonical_identity("email:alice+intake@acme.test", declared) == "email:alice@acme.test"
    assert canonical_identity("email:alice+a+b@acme.test", declared) == "email:alice@acme.test"
    assert canonical_identity("email:alice+x@other.test", declared) == "email:alice+x@other.test"
    assert canonical_identity("email:+x@acme.test", declared) == "email:+x@acme.test"  # no local part left
    assert canonical_identity("slack:U0ALICE001", declared) == "slack:U0ALICE001"
    assert canonical_identity("email:alice+x@acme.test") == "email:alice+x@acme.test"  # nothing declared


def test_a_plus_address_of_her_own_mailbox_is_alice(settings: Settings) -> None:
    """alice mails from alice+intake@acme.test (same mailbox, DMARC pass) and tries to promote
    it; then she mails as Alice+Intake@ (case) too. Both are her own words: refused."""
    codes = enrol(settings, {"alice": ("platform", ("email:alice@acme.test",)), "carol": ("security", ())})
    with open_broker(settings) as broker:
        assert "acme.test" in broker.policy.identities.email_subaddress_domains
        for sender in ("email:alice+intake@acme.test", "email:alice+intake@acme.test".upper().replace("EMAIL:", "email:")):
            idea = broker.store.capture(draft(channel=Channel.EMAIL, requester=sender.lower(),
                                              text="rotate the payments key"))[0]
            with pytest.raises(Refused) as refused:
                broker.gatekeeper.promote(idea.id, repo="acme/web", change_type="docs", approver_id="alice",
                                          code=codes["alice"].next())
            assert refused.value.reason == "self_approval"
            assert broker.store.get_idea(idea.id).task_id is None


def test_an_undeclared_domain_is_not_folded(settings: Settings) -> None:
    """For a domain the policy does not declare, bob+x@ may be another mailbox: not alice's."""
    codes = enrol(settings, {"alice": ("platform", ("email:alice@elsewhere.test",))})
    with open_broker(settings) as broker:
        idea = broker.store.capture(draft(channel=Channel.EMAIL, requester="email:alice+x@elsewhere.test",
                                          text="update the docs"))[0]
        decided = broker.gatekeeper.promote(idea.id, repo="acme/web", change_type="docs", approver_id="alice",
                                            code=codes["alice"].next())
        assert decided.task.approvals[0].approver == "alice"
