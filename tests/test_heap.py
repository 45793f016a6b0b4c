"""Giving memory back: a mapped file's pages are dropped only where they still read as the
file does."""

from __future__ import annotations

import mmap
import sys

import pytest

from mesh.heap import drop_mapped
from tests.conftest import resident_kb_under

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/smaps")


def test_unwritten_private_mappings_drop_their_pages_and_read_the_same(tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB
    clean, dirty = tmp_path / "clean.bin", tmp_path / "dirty.bin"
    clean.write_bytes(data)
    dirty.write_bytes(data)
    with open(clean, "rb") as fc, open(dirty, "rb") as fd:
        # private and writable, as ONNX Runtime maps a model's external weights
        a = mmap.mmap(fc.fileno(), 0, access=mmap.ACCESS_COPY)
        b = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        assert a[:] == data and b[:] == data  # every page touched
        b[5] = 0  # one page of b now holds a change of its own
        assert resident_kb_under(str(clean)) >= 1024
        advised = drop_mapped(str(tmp_path))
        assert advised == len(data)  # a only: b's pages are not the file's any more
        assert resident_kb_under(str(clean)) == 0
        assert resident_kb_under(str(dirty)) >= 1024
        assert a[:] == data  # faulted back in from the file
        assert b[5] == 0 and b[6:] == data[6:]
    finally:
        a.close()
        b.close()
