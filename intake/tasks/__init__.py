"""From idea to delivered change: promotion (:mod:`.promotion`), dispatch to RQ (:mod:`.dispatch`), applying workers' reports (:mod:`.worker_reports`), and signed provenance (:mod:`.provenance`)."""
