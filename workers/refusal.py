"""Why a worker refused a job: one named error with a stable reason tag, raised anywhere from
the job guard to the run, so RQ files the job as failed with that reason."""

from __future__ import annotations

from intake.core.errors import IntakeError


class JobRefused(IntakeError):
    """A job was refused before (or instead of) running; ``reason`` is a stable tag."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)
