"""Buffers that are the page cache itself: a buffer's chunks mapped side by side into one range.

The shuffled reader's buffer is `buffer_chunks` chunks from scattered shard files. Reading them
with pread copies every byte once before the shuffled gather copies it again. Here each chunk is
mmap'ed (MAP_FIXED) from its shard file into its place in one reserved address range, so the
buffer is a single (rows, d) array whose pages are the kernel's page-cache pages, and the gather
reads them directly: one copy of each byte fewer.

The mappings are MAP_PRIVATE and writable: a write (no reader code writes a buffer) would make a
private copy of the page, never touch the store and never fault. MADV_POPULATE_READ (Linux 5.14)
fills in the page tables in the loading thread, so the pages are read from the disk there, not
in the thread that gathers; where the kernel lacks it, pages are faulted in on first touch.

Linux (and other platforms with mmap, MAP_FIXED and MAP_ANONYMOUS in libc) only. `MappedRange.
create` returns None where that is not available, and the reader keeps using pread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import weakref

import numpy as np

PAGE = mmap.PAGESIZE
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)  # Python 3.11's mmap module does not export it
_PROT_NONE = getattr(mmap, "PROT_NONE", 0)
_MADV_POPULATE_READ = 22  # Linux 5.14+; EINVAL on older kernels, then pages fault in on use
_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or os.environ.get("DSAE_READER_MMAP", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class MappedRange:
    """A reserved range of `nbytes` address space whose pages map pieces of files (or zeros).

    Remapping a piece replaces what was there atomically (MAP_FIXED); the range is released when
    the object is collected. Whoever holds an array from `array()` must be done with it before
    the same bytes are remapped (the reader's slots guarantee that, as they do for pread).
    """

    def __init__(self, libc: ctypes.CDLL, addr: int, nbytes: int) -> None:
        self._libc, self.addr, self.nbytes = libc, addr, nbytes
        self._populate = True
        weakref.finalize(self, libc.munmap, ctypes.c_void_p(addr), nbytes)

    @classmethod
    def create(cls, nbytes: int) -> "MappedRange | None":
        """Reserve nbytes (rounded up to pages) of address space, or None where unsupported."""
        if _LIBC is None:
            return None
        nbytes = -(-nbytes // PAGE) * PAGE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        addr = _LIBC.mmap(None, nbytes, _PROT_NONE, flags, -1, 0)
        if addr in (None, _FAILED):
            return None
        return cls(_LIBC, addr, nbytes)

    def map_file(self, at: int, length: int, fd: int, offset: int) -> None:
        """Bytes [at, at + length) of the range <- bytes [offset, ...) of file fd.
        at and offset must be page multiples."""
        self._map(at, length, fd, offset, mmap.MAP_PRIVATE)

    def map_zeros(self, at: int, length: int) -> None:
        """Bytes [at, at + length) of the range <- zeros (a chunk that was never written)."""
        self._map(at, length, -1, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def _map(self, at: int, length: int, fd: int, offset: int, flags: int) -> None:
        if at % PAGE or offset % PAGE or at + length > self.nbytes or length <= 0:
            raise ValueError(f"unaligned or out-of-range mapping: at={at} length={length} "
                             f"offset={offset} in a range of {self.nbytes} bytes")
        want = self.addr + at
        got = self._libc.mmap(ctypes.c_void_p(want), length, mmap.PROT_READ | mmap.PROT_WRITE,
                              flags | _MAP_FIXED, fd, offset)
        if got != want:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {length} bytes at offset {offset}: {os.strerror(err)}")
        if fd >= 0 and self._populate:
            if self._libc.madvise(ctypes.c_void_p(want), length, _MADV_POPULATE_READ) != 0:
                self._populate = False  # an older kernel: fault pages in on first touch

    def array(self, nbytes: int, dtype: np.dtype, row_shape: tuple[int, ...]) -> np.ndarray:
        """The first nbytes of the range as a (rows, *row_shape) array (no copy)."""
        raw = (ctypes.c_char * nbytes).from_address(self.addr)
        raw._range = self  # the array keeps the range (and so its mappings) alive
        out = np.frombuffer(raw, dtype=np.uint8).view(dtype)
        return out.reshape(-1, *row_shape)
