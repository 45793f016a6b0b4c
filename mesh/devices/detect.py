"""Recognise this machine: collect a ``Probe`` (what the OS says), match it to a profile.

Probing is the only part that touches the system; parsing and matching are pure so tests run
them on captured files from macOS, Jetson, NVIDIA and plain CPU machines.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from mesh.devices.profiles import GB, DeviceProfile


@dataclass
class Probe:
    system: str  # platform.system(): "Darwin", "Linux", ...
    arch: str  # platform.machine(), lower case
    chip: str = ""  # CPU/SoC brand string
    memory_bytes: int = 0  # system RAM
    device_tree_model: str = ""  # /proc/device-tree/model (Jetson, Raspberry Pi)
    tegra_release: str = ""  # /etc/nv_tegra_release (Jetson)
    gpus: list[tuple[str, int]] = field(default_factory=list)  # (name, bytes of VRAM)
    note: str = ""  # why GPUs nvidia-smi lists are not counted (none of them usable here)


@dataclass
class Detection:
    profile: DeviceProfile | None  # with the detected memory filled in
    probe: Probe
    reason: str


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl -a``-style ``key: value`` lines."""
    out = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def parse_meminfo(text: str) -> int:
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def parse_cpuinfo(text: str) -> str:
    for key in ("model name", "Model", "Hardware", "CPU part"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        if m:
            return m.group(1).strip()
    return ""


def parse_nvidia_smi(text: str) -> list[tuple[str, int]]:
    """``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[1].replace(".", "").isdigit():
            gpus.append((parts[0], int(float(parts[1]) * 1024 * 1024)))
    return gpus


def _read(path: str) -> str:
    try:
        return Path(path).read_bytes().replace(b"\0", b"").decode(errors="replace").strip()
    except OSError:
        return ""


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def probe_local() -> Probe:
    system, arch = platform.system(), platform.machine().lower()
    p = Probe(system, arch)
    if system == "Darwin":
        ctl = parse_sysctl(_run(["sysctl", "machdep.cpu.brand_string", "hw.memsize"]))
        p.chip = ctl.get("machdep.cpu.brand_string", "")
        p.memory_bytes = int(ctl.get("hw.memsize", "0") or 0)
    else:
        p.chip = parse_cpuinfo(_read("/proc/cpuinfo"))
        p.memory_bytes = parse_meminfo(_read("/proc/meminfo"))
        p.device_tree_model = _read("/proc/device-tree/model")
        p.tegra_release = _read("/etc/nv_tegra_release")
    if not p.tegra_release:  # NVML / nvidia-smi is absent on Jetson
        gpus = visible_gpus(parse_nvidia_smi(_run(["nvidia-smi", "--query-gpu=name,memory.total",
                                                   "--format=csv,noheader,nounits"])),
                            os.environ.get("CUDA_VISIBLE_DEVICES"))
        p.gpus, p.note = usable_gpus(gpus, bool(gpus) and _cuda_backend())
    return p


def usable_gpus(gpus: list[tuple[str, int]], cuda: bool) -> tuple[list[tuple[str, int]], str]:
    """The GPUs a backend here can compute on, and why the rest are not counted: with torch
    built without CUDA (the CPU wheel) and onnxruntime without its CUDA provider, a machine's
    GPU does nothing, and planning it as one would give it a GPU's share of the layers (and
    torch, which then computes on the CPU, several times slower than onnxruntime there)."""
    if not gpus or cuda:
        return gpus, ""
    names = ", ".join(sorted({name for name, _ in gpus}))
    return [], (f"nvidia-smi lists {names}, but no backend installed here can use it (torch "
                "without CUDA, onnxruntime without its CUDA provider): planned as this CPU")


def _cuda_backend() -> bool:
    """Whether an installed backend computes on CUDA (imports it: only asked when nvidia-smi
    lists a GPU; onnxruntime first, the lighter import, then torch)."""
    import importlib.util

    try:
        if importlib.util.find_spec("onnxruntime"):
            import onnxruntime

            if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & \
                    set(onnxruntime.get_available_providers()):
                return True
        if importlib.util.find_spec("torch"):
            import torch

            return torch.cuda.is_available()
    except Exception:  # a broken install computes on nothing
        return False
    return False


def visible_gpus(gpus: list[tuple[str, int]], visible: str | None) -> list[tuple[str, int]]:
    """The GPUs CUDA lets this process use: nvidia-smi lists every GPU, but
    ``CUDA_VISIBLE_DEVICES=""`` (or ``-1``) hides them all (the process computes on its CPU
    and must not be planned as a GPU) and ``0,2`` keeps those indices, up to the first
    entry that names no GPU, as CUDA does. GPU UUIDs keep the list as it is."""
    if visible is None:
        return gpus
    keep = []
    for v in (v.strip() for v in visible.split(",")):
        if v.startswith(("GPU-", "MIG-")):
            return gpus
        if not v.lstrip("-").isdigit() or not 0 <= int(v) < len(gpus):
            break  # CUDA stops at the first entry that names no GPU
        keep.append(gpus[int(v)])
    return keep


def _matches(m: dict, probe: Probe) -> bool:
    if not m:
        return False
    if "system" in m and m["system"] != probe.system:
        return False
    if "arch" in m and probe.arch not in m["arch"]:
        return False
    if "chip_contains" in m and not any(s in probe.chip for s in m["chip_contains"]):
        return False
    if "chip_excludes" in m and any(s in probe.chip for s in m["chip_excludes"]):
        return False
    if "device_tree_contains" in m and not any(s in probe.device_tree_model
                                               for s in m["device_tree_contains"]):
        return False
    if "gpu_contains" in m and not any(s in name for name, _ in probe.gpus
                                       for s in m["gpu_contains"]):
        return False
    return True


def match(probe: Probe, profiles: dict[str, DeviceProfile]) -> Detection:
    """The most specific matching profile, with this machine's memory filled in."""
    hits = [p for p in profiles.values() if _matches(p.match, probe)]
    note = f"; {probe.note}" if probe.note else ""
    if not hits:
        return Detection(None, probe, "no profile matches: unknown machine "
                         f"({probe.system} {probe.arch}, {probe.chip or 'unknown chip'}, "
                         f"{probe.memory_bytes / GB:.1f} GiB); run `mesh devices calibrate`"
                         + note)
    # GPUs first (a GPU no profile names: the fallback that takes any, gpu_contains [""]),
    # then the most specific rule; generic (arch-only) profiles last
    def rank(p: DeviceProfile):
        return ("gpu_contains" in p.match, all(p.match.get("gpu_contains", [])),
                len(p.match) - ("arch" in p.match), -len(p.path))

    best = max(hits, key=rank)
    if best.kind == "nvidia":
        vram = max((mem for name, mem in probe.gpus
                    if any(s in name for s in best.match.get("gpu_contains", []))), default=0)
        memory = vram / GB if vram else best.memory_gb
    else:
        memory = probe.memory_bytes / GB if probe.memory_bytes else best.memory_gb
    why = (f"matched {Path(best.path).name} by {', '.join(sorted(best.match))}; "
           f"memory {memory:.1f} GiB detected")
    if not all(best.match.get("gpu_contains", ["-"])):
        why += ("; no profile names this GPU: its figures are a low guess, "
                "`mesh devices calibrate` measures it")
    return Detection(best.with_memory(round(memory, 2)), probe, why + note)
