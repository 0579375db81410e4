"""People and their power: one person many identities (:mod:`.registry`), approver enrolment (:mod:`.approvers`), TOTP step-up (:mod:`.mfa`) and passkeys (:mod:`.passkeys`)."""
