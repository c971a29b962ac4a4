"""How fast this machine's disk gives back a file that is not in the page cache, read as a memory loader could read
it: 4.3 GB written and synced, dropped from the page cache (posix_fadvise DONTNEED) before each pass, then read in
chunks by a pool of threads, buffered or with O_DIRECT (page-aligned buffers), for a few thread counts and chunk
sizes. DocumentMemory.load reads its files buffered, 16 threads, 64 MB chunks: this tells whether another pattern
would read faster on a given machine.

    python benchmarks/probe_disk.py /path/on/the/disk/probe.bin
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

SIZE = 4 << 30
PASSES = [  # (name, threads, chunk bytes, O_DIRECT)
    ("buffered", 16, 64 << 20, False),
    ("buffered", 1, 64 << 20, False),
    ("O_DIRECT", 1, 64 << 20, True),
    ("O_DIRECT", 16, 64 << 20, True),
    ("O_DIRECT", 32, 8 << 20, True),
    ("O_DIRECT", 64, 4 << 20, True),
    ("buffered", 16, 64 << 20, False),
]


def _drop(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def _read(path: str, threads: int, chunk: int, direct: bool) -> float:
    """GB/s of one pass over the file."""
    _drop(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    local = threading.local()

    def part(offset: int) -> None:
        if not hasattr(local, "buffer"):
            local.buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        done = 0
        while done < chunk:
            got = os.preadv(fd, [memoryview(local.buffer)[done:]], offset + done)
            if got <= 0:
                raise RuntimeError(f"{path}: the file ended early")
            done += got

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(0, SIZE, chunk)))
    seconds = time.perf_counter() - start
    os.close(fd)
    return SIZE / seconds / 1e9


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "probe_disk.bin"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    block = os.urandom(64 << 20)
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(SIZE // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    print(f"wrote {SIZE / 1e9:.2f} GB in {time.perf_counter() - start:.2f} s", flush=True)
    try:
        for name, threads, chunk, direct in PASSES:
            rate = _read(path, threads, chunk, direct)
            print(f"{name}: {threads} threads, {chunk >> 20} MB chunks: {rate:.2f} GB/s", flush=True)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
