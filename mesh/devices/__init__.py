"""What a machine can hold and how fast it is: the planner's input.

``devices/*.toml`` describe known hardware (strictly parsed, ``profiles``); ``detect``
recognises this machine; ``calibrate`` measures one mesh has never seen.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from mesh.devices.profiles import GB, DeviceProfile, ProfileError, load_profiles

log = logging.getLogger(__name__)

__all__ = ["GB", "DeviceProfile", "ProfileError", "detect_local", "load_profiles",
           "resident_bytes"]


def resident_bytes() -> int:
    """This process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss


def detect_local(backend: str, memory_gb: float | None = None) -> DeviceProfile:
    """This machine's profile (detected, or generic), for ``backend``.

    ``memory_gb`` overrides the usable memory, like DwarfStar's ``--effective-vram``;
    ``MESH_BANDWIDTH_GBPS`` overrides the bandwidth (e.g. from ``mesh devices calibrate``).
    """
    from mesh.devices.detect import match, probe_local

    try:
        found = match(probe_local(), load_profiles())
        prof = found.profile
    except ProfileError as exc:
        log.warning("device profiles unreadable (%s); using a generic profile", exc.message)
        prof = None
    if prof is None:
        import psutil

        prof = DeviceProfile("unknown", "cpu", backend, psutil.virtual_memory().total / GB,
                             0.6, 10.0, source="unknown machine: conservative defaults")
    prof = replace(prof, backend=backend)
    if memory_gb is not None:
        prof = prof.with_memory(memory_gb, 1.0)
    env_bw = os.environ.get("MESH_BANDWIDTH_GBPS")
    if env_bw:
        prof = replace(prof, bandwidth_gbps=float(env_bw))
    return prof
