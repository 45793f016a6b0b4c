"""What a machine can hold and how fast it is: the planner's input.

This is the minimal profile the pipeline needs (memory, usable fraction, bandwidth, compute);
the profile files in devices/ and detection of known hardware build on it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

GB = 1024 ** 3


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    backend: str
    memory_gb: float  # physical memory (or VRAM)
    usable_fraction: float  # share of it mesh may fill with weights + KV cache
    bandwidth_gbps: float  # memory bandwidth; decode time per layer scales with 1 / this
    tflops: float = 0.0

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_gb * self.usable_fraction * GB)


def detect_local(backend: str, memory_gb: float | None = None) -> DeviceProfile:
    """A profile for this machine; ``memory_gb`` overrides the usable memory (like
    DwarfStar's --effective-vram)."""
    import psutil

    total = psutil.virtual_memory().total / GB
    machine = platform.machine().lower()
    if platform.system() == "Darwin" and machine == "arm64":
        prof = DeviceProfile("apple-silicon", backend, total, 0.70, 100.0, 3.0)
    elif machine in ("x86_64", "amd64"):
        # one-thread NumPy streaming measured ~27 GB/s on the reference 2-core box
        prof = DeviceProfile("generic-x86_64-cpu", backend, total, 0.60, 25.0, 0.2)
    else:
        prof = DeviceProfile("generic-arm64-cpu", backend, total, 0.60, 10.0, 0.1)
    if memory_gb is not None:
        prof = DeviceProfile(prof.name, backend, memory_gb, 1.0, prof.bandwidth_gbps,
                             prof.tflops)
    env_bw = os.environ.get("MESH_BANDWIDTH_GBPS")
    if env_bw:
        prof = DeviceProfile(prof.name, backend, prof.memory_gb, prof.usable_fraction,
                             float(env_bw), prof.tflops)
    return prof
