"""Named errors. Each carries a one-line, user-facing message and the data a caller needs.

Library errors (redis, pydantic, cryptography) are translated into these at the edge, so the
CLI and the HTTP app can print one clear line and never a traceback.
"""

from __future__ import annotations


class IntakeError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for a person."""

    exit_code = 1


class ConfigError(IntakeError):
    """A setting is missing or invalid; the message names the variable."""

    exit_code = 2


class PolicyError(IntakeError):
    """The policy file is invalid; ``field`` names the offending field."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class RedisUnavailable(IntakeError):
    """Redis could not be reached or started."""


class NotFound(IntakeError):
    """No idea, task or approver with that id."""


class InvalidInput(IntakeError):
    """Refused input: empty or oversize text, a malformed id, a bad argument."""


class IllegalTransition(IntakeError):
    """The requested state change is not allowed from the current state; nothing changed."""

    def __init__(self, kind: str, ident: str, current: str, wanted: str) -> None:
        self.kind, self.ident, self.current, self.wanted = kind, ident, current, wanted
        super().__init__(f"{kind} {ident} is {current}; it cannot become {wanted}")


class Refused(IntakeError):
    """An approval, promotion or other request was refused; ``reason`` is a stable tag.

    The tag is what the audit log and metrics record; the message is for people.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class TokenInvalid(IntakeError):
    """A dispatch token or lease failed verification; ``reason`` is a stable tag."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class AuditBroken(IntakeError):
    """The audit chain failed verification; ``event_id`` is the first bad event and ``report``
    (when the whole chain was walked) lists every anomaly found."""

    def __init__(self, event_id: str, message: str, *, report: object | None = None) -> None:
        self.event_id = event_id
        self.report = report
        super().__init__(message)


class LedgerHalted(IntakeError):
    """The broker's verified ledger found broken history: nothing that grants power happens
    until an operator acts (``intake audit verify`` says what, and where)."""
