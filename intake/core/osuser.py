"""The OS account this process runs as, for the ``os:<name>`` identities the host commands
record and link.

Not :func:`getpass.getuser`: that reads ``LOGNAME``/``USER`` first, which anyone can set, so
``LOGNAME=mallory intake admin bootstrap alice`` would link alice to mallory's account and put
mallory's name on the audit log. The effective uid is what the kernel says we are (the same
source the local socket's ``SO_PEERCRED`` check uses for callers).
"""

from __future__ import annotations

import os
import pwd


def os_user() -> str:
    """The name of the effective uid's account (``uid<N>`` when it has no passwd entry)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"
