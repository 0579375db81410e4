"""The tamper-evident audit log (:mod:`.log`), the verified ledger derived from its sealed entries (:mod:`.ledger`), and the lease that lets one process seal at a time (:mod:`.sealer`)."""
