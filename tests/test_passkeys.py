"""Passkeys without a browser: the policy's step_up, and what a Redis writer cannot do."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyotp
import pytest
import redis

from intake.core.errors import PolicyError, Refused
from intake.core.models import Channel
from intake.core.policy import load_policy
from intake.core.settings import Settings, load_settings
from intake.people.passkeys import PasskeyProof, bound_challenge
from intake.runtime import EXAMPLE_POLICY, open_broker
from tests.factories import draft, previous_step_code


def _with(tmp: Path, text: str) -> Path:
    path = tmp / "policy.toml"
    path.write_text(EXAMPLE_POLICY.read_text().replace("[risk_tiers.standard]\n", "[risk_tiers.standard]\n" + text))
    return path


def test_policy_step_up_is_validated(tmp_path: Path) -> None:
    assert load_policy(_with(tmp_path, 'step_up = "passkey"\n')).risk_tiers["standard"].step_up == "passkey"
    with pytest.raises(PolicyError) as err:
        load_policy(_with(tmp_path, 'step_up = "sms"\n'))
    assert err.value.field == "risk_tiers.standard.step_up"


def test_a_passkey_tier_refuses_a_totp_code(settings: Settings, tmp_path: Path) -> None:
    assert settings.redis_url is not None
    s = load_settings(_env_file=None, data_dir=settings.data_dir, redis_url=settings.redis_url.get_secret_value(),
                      policy=_with(tmp_path, 'step_up = "passkey"\n'))
    with open_broker(s) as broker:
        broker.approvers.add(broker.policy, "alice", name="Alice", groups=("platform",),
                                         slack_user=None, email=None, actor="cli:root")
        enrolment = broker.approvers.enrol("alice", actor="approver:alice")
        totp = pyotp.parse_uri(enrolment.otpauth_uri)
        broker.approvers.confirm("alice", previous_step_code(totp), actor="approver:alice")
        idea, _ = broker.store.capture(draft(channel=Channel.CLI, requester="cli:erin"))
        with pytest.raises(Refused) as err:
            broker.gatekeeper.promote(idea.id, repo="acme/web", change_type="docs", approver_id="alice",
                                      code=totp.now())
        assert err.value.reason == "passkey_required"
        assert broker.store.get_idea(idea.id).task_id is None
        # The code was not spent: the same code still works where TOTP is allowed.
        approver = broker.approvers.get("alice")
        assert broker.approvers.check_stepup(approver, totp.now(), purpose="signin", subject="alice") == "totp"


def test_a_redis_writer_cannot_plant_a_passkey_or_reuse_a_challenge(settings: Settings, redis_server: str) -> None:
    with open_broker(settings) as broker:
        broker.approvers.add(broker.policy, "alice", name="Alice", groups=("platform",), slack_user=None,
                             email=None, actor="cli:root")
        approver = broker.approvers.get("alice")
        passkeys = broker.approvers.passkeys
        assert passkeys is not None
        # A plain client, no broker keys: writes a credential of its own for alice.
        attacker = redis.Redis.from_url(redis_server, decode_responses=True)
        planted = {"id": "AAAA", "public_key": "AAAA", "sign_count": 0, "created_at": 1.0, "mac": "0" * 64}
        attacker.hset(broker.store.keys.passkeys("alice"), "AAAA", json.dumps(planted))
        assert passkeys.list("alice") == []
        challenge_id, options = passkeys.assertion_options(approver, action="approve", subject="T-000000000001",
                                                           bound="a" * 64)
        assert options["allowCredentials"] == []
        # It rewrites the outstanding challenge to name another spec hash: the challenge the
        # browser signs was derived from the original, so the rewrite cannot match it.
        key = broker.store.keys.passkey_challenge(challenge_id)
        record = json.loads(attacker.get(key))
        nonce = base64.b64decode(record["nonce"])
        assert bound_challenge(nonce, "alice", "approve", "T-000000000001", "a" * 64) != bound_challenge(
            nonce, "alice", "approve", "T-000000000001", "b" * 64)
        proof = PasskeyProof(challenge_id=challenge_id, credential={"id": "AAAA"})
        with pytest.raises(Refused) as err:
            passkeys.verify(approver, proof, action="approve", subject="T-000000000001", bound="a" * 64)
        assert err.value.reason == "passkey_unknown_credential"  # the planted key is not trusted
        with pytest.raises(Refused) as err:  # and the challenge was used up
            passkeys.verify(approver, proof, action="approve", subject="T-000000000001", bound="a" * 64)
        assert err.value.reason == "passkey_challenge_unknown"
        attacker.close()
