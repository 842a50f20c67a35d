"""Fault points: places where scripts/fault_campaign.py makes a process SIGKILL itself, at moments
too short to hit from outside (a checkpoint of a small bank is written in a few milliseconds).

    DSAE_FAULT=<point>:<n>:<marker file>

kills the process on its n-th pass (1-based) through `fault_point(<point>)`, once: the marker
file is created first (O_EXCL), so a restarted job or a replacement actor that inherits the
variable goes on. The signal is a real SIGKILL: no handler, no flush, no atexit. Unset (every real
run), a fault point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "DSAE_FAULT"
POINTS = ("harvest_load", "store_write", "checkpoint_write", "member_write")

_passes: Counter[str] = Counter()


def fault_point(point: str) -> None:
    """SIGKILL this process here if DSAE_FAULT names `point` and this is its n-th pass."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, n, marker = spec.split(":", 2)
    if name != point:
        return
    _passes[point] += 1
    if _passes[point] != int(n):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # fired already, in this process's predecessor
        return
    os.write(fd, f"{point} pass {n} pid {os.getpid()}\n".encode())
    os.fsync(fd)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
