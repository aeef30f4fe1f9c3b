"""Crash points for tests of what the local runner never does: `DELG_FAILPOINT=<name>` SIGKILLs the process there.

The exactly-once tests kill a real run at these points and resume it; nothing else sets the variable.
Names: "write" (a bundle has written temp files, nothing is committed), "finalize" (every shard is
committed, the summary is not written), "success" (summary.json written, _SUCCESS not yet).
"""

from __future__ import annotations

import os
import signal

ENV = "DELG_FAILPOINT"


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL (no cleanup at all) when DELG_FAILPOINT names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
