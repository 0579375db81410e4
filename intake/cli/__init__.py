"""The ``intake`` command line (:mod:`.main`), a client of the broker's API (:mod:`.client`), with its terminal views (:mod:`.records`, :mod:`.provenance`)."""
