"""Lease owners of claimed rows: '<role>:<host>:<pid>', and whether a local owner is gone.

A claimed job or outbox entry normally waits for its lease to expire before another process
takes it. When its owner ran on this host and that process no longer exists (it crashed or
was killed), the claim can be released at once instead.
"""

from __future__ import annotations

import os
import socket


def lease_owner_name(role: str) -> str:
    """Return the lease owner name of this process for a role such as "worker" or "sender"."""
    return f"{role}:{socket.gethostname()}:{os.getpid()}"


def is_dead_local_owner(owner: str, role: str) -> bool:
    """Return True when `owner` names a process of `role` on this host that no longer runs."""
    prefix = f"{role}:{socket.gethostname()}:"
    if not owner.startswith(prefix):
        return False
    pid_text = owner.removeprefix(prefix)
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
