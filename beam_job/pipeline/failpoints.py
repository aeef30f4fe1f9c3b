"""Crash points for tests of what the local runner never does: SIGKILL, fail once or pause a process at a named point.

Nothing but the tests sets these variables. Names: "write" (a bundle has written temp files, nothing is
committed), "committed_features" / "committed_failures" (that kind's shards are committed, the other kind's
may not be: the window between the two commits), "finalize" (every shard is committed, the summary is not
written), "success" (summary.json written, _SUCCESS not yet).

Two ways to arm a point:

* `DELG_FAILPOINT=<name>`: every process that reaches the point SIGKILLs itself (the exactly-once tests kill
  a local run this way and resume it).
* `DELG_FAILPOINT_DIR=<folder>` and a file `<folder>/<name>` holding an action: the FIRST process to reach the
  point takes the file (an atomic rename, so exactly one process fires however many workers run) and then
  `kill` (SIGKILL itself), `raise` (the bundle fails with FailpointError, so the runner must retry it) or
  `wait <seconds>` (write `<name>.reached` with its pid, then sleep: a test kills something meanwhile). The
  taken file is left as `<name>.fired-<pid>`. This is how the tests arm a point inside the SDK workers of a
  running cluster, whose environment is fixed when the workers' pool starts.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "DELG_FAILPOINT"
DIR_ENV = "DELG_FAILPOINT_DIR"


class FailpointError(RuntimeError):
    """Raised by a point armed with `raise`: a bundle that fails on its first attempt only."""


def failpoint(name: str) -> None:
    """Act as armed for `name` (see the module docstring); nothing when the point is not armed."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    folder = os.environ.get(DIR_ENV)
    if not folder:
        return
    armed = os.path.join(folder, name)
    taken = f"{armed}.fired-{os.getpid()}"
    try:
        os.rename(armed, taken)  # atomic: one process wins, the others find no file
    except OSError:
        return
    with open(taken) as fh:
        action = fh.read().split()
    if action[:1] == ["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)
    elif action[:1] == ["raise"]:
        raise FailpointError(f"failpoint {name!r} armed to fail once (pid {os.getpid()})")
    elif action[:1] == ["wait"]:
        with open(armed + ".reached.tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(armed + ".reached.tmp", armed + ".reached")
        time.sleep(float(action[1]) if len(action) > 1 else 60.0)
