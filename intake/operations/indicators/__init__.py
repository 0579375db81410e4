"""The leading-indicator report: figures from the sealed audit log (:mod:`.figures`) and their
renderings as text, JSON and self-contained HTML (:mod:`.render`)."""
