"""The dependency gate: what a change does to its dependencies, and whether policy admits it.

* :mod:`.files` says which paths are manifests and lockfiles, :mod:`.manifests` and
  :mod:`.lockfiles` parse them (pure, bounded, never executing or fetching anything),
* :mod:`.versions` normalises names and compares versions per ecosystem,
* :mod:`.delta` computes the change's dependency delta from the worker's trusted copies,
* :mod:`.gate` checks the delta against the policy's ``[dependencies]``, :mod:`.licenses`
  evaluates SPDX expressions, :mod:`.sbom` writes the CycloneDX document.

This package module imports nothing, so that :mod:`intake.workers.gates` can use
:mod:`.files` without an import cycle.
"""
