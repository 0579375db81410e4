"""The broker's HTTP API (``/api/v1``): callers (:mod:`intake.api.callers`) and routes
(:mod:`intake.api.routes`). The CLI is its client (:mod:`intake.cli.client`)."""
