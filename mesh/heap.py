"""Give freed heap memory back to the operating system."""

from __future__ import annotations

import ctypes
import gc
import sys


def trim() -> None:
    """glibc keeps the pages of freed allocations (loading a tokenizer or building a graph
    frees hundreds of MB of parse trees and copies); hand them back. Linux only, a no-op
    elsewhere."""
    gc.collect()
    release_free()


def release_free() -> None:
    """Hand glibc's free pages back now (``malloc_trim``, no garbage collection): buffers of
    a few MB come from the heap once glibc has raised its mmap threshold, and their pages
    stay with the process after ``free`` otherwise."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def drop_mapped(prefix: str) -> int:
    """Drop this process's resident pages of file mappings under ``prefix`` that hold no
    change of their own.

    ONNX Runtime maps a shard's weight file (privately, one mapping per tensor) and keeps the
    mappings after copying what it prepacks; building the prepacked copy read every page, so
    they stay counted in the process's memory beside the copy (Gemma 3: 35 MB of scales,
    never read again). A mapping none of whose pages were written (no anonymous pages in
    ``smaps``) reads the same from the file, so its pages can go: those read later fault
    back in from the page cache. Linux only; returns the bytes advised (0 elsewhere)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except (OSError, AttributeError):
        return 0
    spans, span = [], None
    for line in lines:
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header
            ours = len(parts) == 6 and parts[5].startswith(prefix)
            span = [int(x, 16) for x in parts[0].split("-")] if ours else None
            if span:
                spans.append(span)
        elif span and parts[0] == "Anonymous:" and parts[1] != "0":
            spans.remove(span)  # written to: its pages are not the file's any more
            span = None
    advised = 0
    for lo, hi in spans:
        if libc.madvise(lo, hi - lo, 4) == 0:  # MADV_DONTNEED
            advised += hi - lo
    return advised
