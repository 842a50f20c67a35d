"""Reused float32 batch arrays, and one-thread torch ops in the reader's own threads.

Both remove costs that dominated the shuffled reader on the 2-core build machine (AMD EPYC, 32 MB
L3, other jobs running; float16 d=576 rows):
- a fresh 4096 x 576 float32 tensor per block costs its page faults: casting a batch into a new
  tensor ran at 0.7 GB/s of float16 bytes against 23 GB/s into a reused one (glibc maps large
  blocks afresh or trims them back to the kernel, so every new block page-faults);
- torch's OpenMP copies from a background thread next to the training thread's own OpenMP team
  oversubscribe 2 cores: a gather + cast of 4096-row blocks ran at 0.37 GB/s with 2 threads against
  3.9 GB/s with one (load average ~5 from others' jobs).
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def _refs_in_loop(arrays: list[np.ndarray]) -> int:
    for arr in arrays:  # the same loop as BlockPool._free_array, so the same references
        return sys.getrefcount(arr)
    return 0


# References to a pooled array that nobody else holds, counted inside BlockPool's loop: the
# list, the loop variable and getrefcount's argument (3 on CPython 3.11; measured, not assumed,
# since newer interpreters skip some increments).
_UNUSED_REFS = _refs_in_loop([np.empty(0)])


class BlockPool:
    """(<= rows, d) float32 tensors backed by numpy arrays that are reused once unreferenced.

    torch.from_numpy keeps its array alive through the tensor's storage, so while any tensor,
    view or .numpy() of a block lives, its array's reference count stays above the pool's own:
    an array is handed out again only when the consumer has dropped everything made from it.
    At most `cap` arrays are kept; beyond that blocks are fresh, unpooled allocations.
    """

    def __init__(self, rows: int, d: int, cap: int) -> None:
        self.rows, self.d, self.cap = rows, d, cap
        self._arrays: list[np.ndarray] = []  # each (rows, d) float32
        self._lock = threading.Lock()  # the producer thread and the consumer both take blocks

    def take(self, n: int) -> torch.Tensor:
        """An uninitialised (n, d) float32 tensor, n <= rows."""
        if n > self.rows:
            return torch.empty(n, self.d, dtype=torch.float32)
        with self._lock:
            arr = self._free_array()
            if arr is None:
                arr = np.empty((self.rows, self.d), dtype=np.float32)
                if len(self._arrays) < self.cap:
                    self._arrays.append(arr)
            return torch.from_numpy(arr[:n])  # (n, d) view: keeps arr referenced

    def _free_array(self) -> np.ndarray | None:
        for arr in self._arrays:
            if sys.getrefcount(arr) <= _UNUSED_REFS:
                return arr
        return None

    def __len__(self) -> int:
        return len(self._arrays)


def _openmp_runtime() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch has loaded (pip wheels ship libgomp), or None.

    Only a library already mapped into the process is used, so that no second runtime is loaded.
    """
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text().split("\n")
    except OSError:
        return None
    paths = sorted({line.split()[-1] for line in maps if "libgomp" in line.split("/")[-1]})
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


_omp: list[ctypes.CDLL | None] = []


def single_threaded_torch() -> None:
    """Run torch's CPU ops in the calling thread on that thread alone; other threads keep theirs.

    torch.set_num_threads would also change the process-wide default that new threads copy, so
    this sets only the calling thread's OpenMP thread count (an OpenMP per-thread setting), after
    torch's own lazy per-thread initialisation, which would otherwise overwrite it.
    """
    if not _omp:
        _omp.append(_openmp_runtime())
    torch.get_num_threads()  # torch's per-thread OpenMP set-up happens here, once per thread
    if _omp[0] is None:
        log.debug("no OpenMP runtime found: reader threads keep torch's thread count")
        return
    _omp[0].omp_set_num_threads(1)
