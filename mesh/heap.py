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
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
