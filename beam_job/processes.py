"""Whether a process is alive on this machine (standard library only: scripts/flink_cluster.py imports it too)."""

from __future__ import annotations

import os


def process_alive(pid: int | None) -> bool:
    """Whether the process `pid` runs on this machine: it exists (one of another user counts) and is not a
    zombie (exited, not yet reaped by its parent: it can no longer do anything). False for no pid."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux): existing is all we can tell
        return True
