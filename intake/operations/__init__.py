"""Running intake: ``intake doctor`` (:mod:`.doctor`), ``/metrics`` (:mod:`.metrics`) and the leading-indicator report (:mod:`.indicators`)."""
