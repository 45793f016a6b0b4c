"""Device profiles: one strict TOML file per kind of machine in devices/.

Our own files are read strictly: an unknown key, a missing key or a wrong type is an error
naming the file and the key (upstream configs, by contrast, are read leniently).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from mesh.errors import MeshError

GB = 1024 ** 3
KINDS = ("apple", "jetson", "nvidia", "cpu")
MATCH_KEYS = {"system": str, "arch": list, "chip_contains": list, "chip_excludes": list,
              "device_tree_contains": list, "gpu_contains": list}


class ProfileError(MeshError):
    pass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str
    backend: str
    memory_gb: float  # physical memory (or VRAM)
    usable_fraction: float  # share mesh may fill with weights + KV cache
    bandwidth_gbps: float  # memory bandwidth: decode time per layer scales with 1 / this
    fp16_tflops: float = 0.0
    int8_tops: float = 0.0
    execution_provider: str = ""
    preferred_dtypes: tuple[str, ...] = ()
    source: str = ""
    match: dict = field(default_factory=dict, compare=False)
    path: str = ""

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_gb * self.usable_fraction * GB)

    @property
    def tflops(self) -> float:
        return self.fp16_tflops

    def with_memory(self, memory_gb: float, usable_fraction: float | None = None):
        from dataclasses import replace

        return replace(self, memory_gb=memory_gb,
                       usable_fraction=self.usable_fraction if usable_fraction is None
                       else usable_fraction)


_TYPES = {"name": str, "kind": str, "backend": str, "execution_provider": str,
          "memory_gb": float, "usable_fraction": float, "bandwidth_gbps": float,
          "fp16_tflops": float, "int8_tops": float, "preferred_dtypes": list, "source": str,
          "match": dict}
_REQUIRED = ("name", "kind", "backend", "memory_gb", "usable_fraction", "bandwidth_gbps",
             "source")


def parse_profile(text: str, path: str) -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from exc
    for key, value in data.items():
        if key not in _TYPES:
            raise ProfileError(f"{path}: unknown key {key!r} "
                               f"(allowed: {', '.join(sorted(_TYPES))})")
        want = _TYPES[key]
        ok = isinstance(value, want) or (want is float and isinstance(value, int)
                                         and not isinstance(value, bool))
        if not ok:
            raise ProfileError(f"{path}: key {key!r} must be {want.__name__}, "
                               f"got {type(value).__name__}")
    for key in _REQUIRED:
        if key not in data:
            raise ProfileError(f"{path}: missing key {key!r}")
    if data["kind"] not in KINDS:
        raise ProfileError(f"{path}: key 'kind' must be one of {', '.join(KINDS)}")
    if not 0 < data["usable_fraction"] <= 1:
        raise ProfileError(f"{path}: key 'usable_fraction' must be in (0, 1]")
    for key in ("memory_gb", "bandwidth_gbps"):
        if data[key] <= 0:
            raise ProfileError(f"{path}: key {key!r} must be positive")
    match = data.get("match", {})
    for key, value in match.items():
        if key not in MATCH_KEYS:
            raise ProfileError(f"{path}: unknown key 'match.{key}' "
                               f"(allowed: {', '.join(sorted(MATCH_KEYS))})")
        if not isinstance(value, MATCH_KEYS[key]):
            raise ProfileError(f"{path}: key 'match.{key}' must be "
                               f"{MATCH_KEYS[key].__name__}")
    names = {f.name for f in fields(DeviceProfile)}
    kwargs = {k: v for k, v in data.items() if k in names}
    kwargs["preferred_dtypes"] = tuple(data.get("preferred_dtypes", ()))
    for k in ("memory_gb", "usable_fraction", "bandwidth_gbps", "fp16_tflops", "int8_tops"):
        if k in kwargs:
            kwargs[k] = float(kwargs[k])
    return DeviceProfile(**kwargs, path=path)


def profiles_dir() -> Path:
    env = os.environ.get("MESH_DEVICES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "devices"


def load_profiles(folder: Path | None = None) -> dict[str, DeviceProfile]:
    """All profiles, keyed by file stem."""
    folder = folder or profiles_dir()
    if not folder.is_dir():
        raise ProfileError(f"no device profile folder at {folder}")
    return {p.stem: parse_profile(p.read_text(), str(p)) for p in sorted(folder.glob("*.toml"))}


def to_toml(p: DeviceProfile) -> str:
    def lit(v):
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(lit(x) for x in v) + "]"
        return repr(float(v))

    lines = [f"# {p.source}"]
    for key in ("name", "kind", "backend", "execution_provider", "memory_gb", "usable_fraction",
                "bandwidth_gbps", "fp16_tflops", "int8_tops", "preferred_dtypes", "source"):
        lines.append(f"{key} = {lit(getattr(p, key))}")
    lines += ["", "[match]"] + [f"{k} = {lit(v)}" for k, v in p.match.items()]
    return "\n".join(lines) + "\n"
