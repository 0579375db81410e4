"""Approver enrolment and lookup. TOTP secrets are encrypted at rest with a key Redis never sees.

Nobody holds another person's factor. An admin *invites* a person (:meth:`Approvers.add`: an
unconfirmed approver with no secret at all, a sealed ``approver.added`` event); the person then
*enrols* (:meth:`Approvers.enrol`: a fresh secret, shown once to whoever called it) through a
channel only they control, and becomes active only after one valid code. Who may call ``enrol``
is the callers' business (the API and console check that the caller *is* the person); this
module never returns a secret from ``add`` or ``reset``. Group membership comes from the policy
file; the groups given at enrolment must agree with it.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from intake.audit.ledger import Ledger
from intake.core.errors import InvalidInput, NotFound, Refused
from intake.core.models import Approver
from intake.core.policy import Policy
from intake.people.mfa import SIGNIN_REFUSED, StepUp, new_secret, provisioning_uri
from intake.people.passkeys import PasskeyProof, Passkeys
from intake.people.registry import People
from intake.storage.store import Pipe, Store


class SecretBox:
    """AES-256-GCM for TOTP secrets; the associated data binds a secret to its owner's ids."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @staticmethod
    def _aad(approver_id: str, slack_user: str | None, generation: int) -> bytes:
        return f"intake-totp-v2|{approver_id}|{slack_user or ''}|{generation}".encode()

    def seal(self, secret: str, approver_id: str, slack_user: str | None, generation: int) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, secret.encode(), self._aad(approver_id, slack_user, generation))
        return base64.b64encode(nonce + sealed).decode()

    def open(self, approver: Approver) -> str:
        """The plaintext secret, or Refused when the record was altered or the key is wrong."""
        try:
            raw = base64.b64decode(approver.secret_enc, validate=True)
            plain = self._aead.decrypt(raw[:12], raw[12:],
                                       self._aad(approver.id, approver.slack_user, approver.generation))
        except (InvalidTag, ValueError):
            raise Refused("secret_unreadable", f"approver {approver.id}'s secret cannot be read; reset it") from None
        return plain.decode()


@dataclass(frozen=True)
class Enrolment:
    approver: Approver
    otpauth_uri: str


class Approvers:
    """Registry of approvers in Redis, plus the step-up check of their codes and passkeys."""

    def __init__(self, store: Store, box: SecretBox, stepup: StepUp, ledger: Ledger,
                 passkeys: Passkeys | None = None, people: People | None = None) -> None:
        self.store = store
        self.box = box
        self.stepup = stepup
        self.ledger = ledger
        self.passkeys = passkeys
        self.people = people or People(store)

    # -- lookup ----------------------------------------------------------------------------
    def get(self, approver_id: str) -> Approver:
        raw = self.store.r.get(self.store.keys.approver(approver_id))
        if raw is None:
            raise Refused("not_approver", f"{approver_id!r} is not a registered approver")
        return Approver.model_validate_json(raw)

    def by_slack_user(self, slack_user: str) -> Approver:
        """The approver with this Slack user id. The index is only a hint: the record itself
        must name the same Slack user (and its sealed secret is bound to it)."""
        approver_id = self.store.r.hget(self.store.keys.approvers, f"slack:{slack_user}")
        if approver_id is not None:
            approver = self.get(approver_id)
            if approver.slack_user == slack_user:
                return approver
        # A Slack id linked to the person later (the person record is MAC'd by the broker).
        person = self.people.resolve(f"slack:{slack_user}")
        if person is None or not self.store.r.exists(self.store.keys.approver(person)):
            raise Refused("not_approver", "you are not a registered intake approver")
        return self.get(person)

    def all(self) -> list[Approver]:
        ids = sorted(k for k in self.store.r.hkeys(self.store.keys.approvers) if k.startswith("id:"))
        raws = self.store.r.mget([self.store.keys.approver(i[3:]) for i in ids]) if ids else []
        return [Approver.model_validate_json(r) for r in raws if r]

    def active(self, approver_id: str) -> Approver:
        """A registered, confirmed approver whose record is the enrolment the sealed history
        names, or Refused saying which it is not."""
        approver = self.get(approver_id)
        if not approver.confirmed:
            raise Refused("not_confirmed", f"approver {approver_id} has not confirmed their authenticator yet")
        self.check_current(approver)
        return approver

    def check_current(self, approver: Approver) -> None:
        """Refuse a record that is not the current enrolment per the ledger (a record or seed
        restored from before a reset or removal)."""
        self.ledger.follow()
        fact = self.ledger.approvers.get(approver.id)
        if fact is None or fact.removed or fact.generation != approver.generation:
            raise Refused("stale_enrolment",
                          f"approver {approver.id}'s record is not their current enrolment; it was "
                          "restored or altered in storage (reset them)")

    def check_code(self, approver: Approver, code: str, *, purpose: str, subject: str) -> int:
        """One TOTP code of ``approver``'s, from a caller already authenticated as them (their
        own session, socket, token or Slack id): failures count on the approver's throttle."""
        if not approver.secret_enc:
            raise Refused("not_enrolled", f"approver {approver.id} has not enrolled an authenticator yet")
        return self.stepup.verify(approver, self.box.open(approver), code, purpose=purpose, subject=subject)

    def check_stepup(
        self, approver: Approver, proof: str | PasskeyProof, *, purpose: str, subject: str, bound: str = "",
        require: str = "any",
    ) -> str:
        """One fresh step-up for ``purpose`` on ``subject``: a TOTP code, or a passkey assertion
        whose challenge names ``purpose``, ``subject`` and ``bound`` (the spec hash or result SHA
        approved). ``require="passkey"`` (a risk tier's ``step_up``) refuses TOTP. Returns the
        factor used (``totp`` or ``passkey``); raises :class:`Refused`, audited."""
        if isinstance(proof, PasskeyProof):
            if self.passkeys is None:
                raise Refused("passkey_unavailable", "passkeys are not available on this broker")
            self.passkeys.verify(approver, proof, action=purpose, subject=subject, bound=bound)
            return "passkey"
        if require == "passkey":
            self.store.audit.record(f"approver:{approver.id}", "mfa.refused", subject,
                                    reason="passkey_required", purpose=purpose)
            raise Refused("passkey_required", "this work needs a passkey approval, not an authenticator code")
        self.check_code(approver, proof, purpose=purpose, subject=subject)
        return "totp"

    def signin(self, approver_id: str, proof: str | PasskeyProof, *, source: str) -> Approver:
        """Sign-in by someone not yet authenticated: the confirmed, current approver
        ``approver_id`` proven by a TOTP code or a passkey assertion, else one uniform
        :class:`Refused` (``signin_failed``/``throttled``) whether the id exists or not. Code
        failures are throttled per ``source`` (see :meth:`StepUp.verify_signin`), never on the
        approver; a passkey sign-in spends no TOTP step."""
        try:
            approver: Approver | None = self.active(approver_id)
        except (Refused, InvalidInput):
            approver = None
        if isinstance(proof, PasskeyProof):
            if approver is None or self.passkeys is None:
                raise Refused("signin_failed", SIGNIN_REFUSED)
            try:
                self.passkeys.verify(approver, proof, action="signin", subject=approver.id)
            except Refused:
                raise Refused("signin_failed", SIGNIN_REFUSED) from None
            return approver
        secret = None
        if approver is not None and approver.secret_enc:
            try:
                secret = self.box.open(approver)
            except Refused:
                secret = None
        self.stepup.verify_signin(approver, secret, proof, approver_id=approver_id, source=source)
        assert approver is not None  # verify_signin only returns for a real approver
        return approver

    # -- changes ---------------------------------------------------------------------------
    def _index(self, pipe: Pipe, approver: Approver) -> None:
        pipe.hset(self.store.keys.approvers, f"id:{approver.id}", approver.id)
        if approver.slack_user:
            pipe.hset(self.store.keys.approvers, f"slack:{approver.slack_user}", approver.id)

    def add(
        self,
        policy: Policy,
        approver_id: str,
        *,
        name: str,
        groups: tuple[str, ...],
        slack_user: str | None,
        email: str | None,
        actor: str,
    ) -> Approver:
        """Invite a person: an unconfirmed approver with no secret. They enrol themselves
        (:meth:`enrol`); the inviter never sees a seed."""
        for group in groups:
            if group not in policy.groups:
                raise InvalidInput(f"--groups: no group {group!r} in the policy")
            if approver_id not in policy.groups[group].members:
                raise InvalidInput(
                    f"--groups: the policy's group {group!r} does not list {approver_id!r}; add it there first"
                )
        generation = self.ledger.follow().next_generation(approver_id)
        try:
            approver = Approver(
                id=approver_id,
                name=name,
                groups=groups,
                slack_user=slack_user,
                email=email.lower() if email else None,
                secret_enc="",  # invited: no factor until the person enrols
                created_at=self.store.clock(),
                generation=generation,
            )
        except ValueError as exc:
            loc = exc.errors()[0]["loc"][0]  # type: ignore[attr-defined]
            raise InvalidInput(f"invalid approver {loc}: {exc.errors()[0]['msg']}") from None  # type: ignore[attr-defined]
        keys = self.store.keys
        if self.store.r.exists(keys.approver(approver_id)):
            raise InvalidInput(f"approver {approver_id} already exists (use `approver reset`)")
        # An approver is a person: create or extend the person first (refused when one of these
        # identities is someone else's), then the approver record.
        links = [f"slack:{slack_user}"] if slack_user else []
        links += [f"email:{approver.email}"] if approver.email else []
        self.people.upsert(approver_id, name=name, identities=tuple(links), actor=actor)

        def build(pipe: Pipe) -> None:
            if pipe.exists(keys.approver(approver_id)):
                raise InvalidInput(f"approver {approver_id} already exists (use `approver reset`)")
            if slack_user and pipe.hget(keys.approvers, f"slack:{slack_user}"):
                raise InvalidInput(f"Slack user {slack_user} is already another approver")
            pipe.multi()
            pipe.set(keys.approver(approver_id), approver.model_dump_json())
            self._index(pipe, approver)
            pipe.delete(keys.totp_last_step(approver_id), keys.totp_failures(approver_id), keys.totp_lock(approver_id))
            self.store.emit(pipe, actor, "approver.added", approver_id, groups=list(groups), slack_user=slack_user,
                            generation=generation, invited=True)

        self.store.transact([keys.approver(approver_id), keys.approvers], build)
        return approver

    def enrol(self, approver_id: str, *, actor: str) -> Enrolment:
        """The person's own enrolment: a fresh secret for an invited (or reset) approver, returned
        once in the URI. Enrolling again before confirming replaces the secret (a lost QR code).
        A confirmed approver re-enrols only through a reset. Callers must have established that
        the caller *is* ``approver_id`` (their own channel); audited as ``approver.enrolling``."""
        approver = self.get(approver_id)
        if approver.confirmed:
            raise Refused("already_enrolled",
                          f"approver {approver_id} already has a confirmed authenticator; reset it first")
        self.check_current(approver)
        secret = new_secret()
        sealed = self.box.seal(secret, approver.id, approver.slack_user, approver.generation)
        keys = self.store.keys
        self._update(approver_id, actor, "approver.enrolling", secret_enc=sealed,
                     expect_generation=approver.generation, expect_unconfirmed=True,
                     clear=[keys.totp_last_step(approver_id)])
        return Enrolment(self.get(approver_id), provisioning_uri(secret, f"{approver_id}@intake"))

    def confirm(self, approver_id: str, code: str, *, actor: str) -> Approver:
        approver = self.get(approver_id)
        if approver.confirmed:
            raise InvalidInput(f"approver {approver_id} is already confirmed")
        self.check_current(approver)
        self.check_code(approver, code, purpose="confirm", subject=approver_id)
        return self._update(approver_id, actor, "approver.confirmed", confirmed=True,
                            expect_generation=approver.generation)

    def reset(self, approver_id: str, *, actor: str) -> Approver:
        """Revoke the approver's factors: the old secret (and every passkey) is dead at once, no
        new one is made here. The person enrols again (:meth:`enrol`) and confirms."""
        self.get(approver_id)
        generation = self.ledger.follow().next_generation(approver_id)
        keys = self.store.keys
        return self._update(
            approver_id, actor, "approver.reset", secret_enc="", confirmed=False, generation=generation,
            # A reset means the old factors are in doubt: passkeys go with the old secret.
            clear=[keys.totp_last_step(approver_id), keys.totp_failures(approver_id), keys.totp_lock(approver_id),
                   keys.passkeys(approver_id)],
        )

    def unlock(self, approver_id: str, *, actor: str) -> None:
        keys = self.store.keys
        self._update(
            approver_id, actor, "approver.unlocked",
            clear=[keys.totp_failures(approver_id), keys.totp_lock(approver_id)],
        )

    def remove(self, approver_id: str, *, actor: str) -> None:
        approver = self.get(approver_id)
        keys = self.store.keys
        generation = self.ledger.follow().next_generation(approver_id)

        def build(pipe: Pipe) -> None:
            pipe.multi()
            pipe.delete(
                keys.approver(approver_id), keys.totp_last_step(approver_id),
                keys.totp_failures(approver_id), keys.totp_lock(approver_id),
            )
            pipe.hdel(keys.approvers, f"id:{approver_id}")
            if self.passkeys is not None:
                self.passkeys.forget(pipe, approver_id)
            if approver.slack_user:
                pipe.hdel(keys.approvers, f"slack:{approver.slack_user}")
            self.store.emit(pipe, actor, "approver.removed", approver_id, generation=generation)

        self.store.transact([keys.approver(approver_id)], build)

    def is_locked(self, approver_id: str) -> bool:
        return bool(self.store.r.exists(self.store.keys.totp_lock(approver_id)))

    def _update(self, approver_id: str, actor: str, action: str, clear: list[str] | None = None,
                expect_generation: int | None = None, expect_unconfirmed: bool = False,
                **changes: object) -> Approver:
        keys = self.store.keys

        def build(pipe: Pipe) -> Approver:
            raw = pipe.get(keys.approver(approver_id))
            if raw is None:
                raise NotFound(f"no approver {approver_id}")
            current = Approver.model_validate_json(raw)
            if expect_generation is not None and current.generation != expect_generation:
                raise Refused("stale_enrolment", f"approver {approver_id} changed meanwhile; try again")
            if expect_unconfirmed and current.confirmed:
                raise Refused("already_enrolled", f"approver {approver_id} confirmed meanwhile")
            updated = current.model_copy(update=changes)
            pipe.multi()
            pipe.set(keys.approver(approver_id), updated.model_dump_json())
            if clear:
                pipe.delete(*clear)
            data = {"generation": updated.generation} if "generation" in changes else {}
            self.store.emit(pipe, actor, action, approver_id, **data)
            return updated

        return self.store.transact([keys.approver(approver_id)], build)
