"""Device profiles: strict parsing, detection on captured files from other platforms,
calibration on this machine, and a plan across very different devices."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from mesh.devices.detect import (Probe, match, parse_cpuinfo, parse_meminfo, parse_nvidia_smi,
                                 parse_sysctl, usable_gpus, visible_gpus)
from mesh.devices.profiles import GB, ProfileError, load_profiles, parse_profile, to_toml
from mesh.pipeline.planner import ModelCost, NodeCapacity, format_plan, plan

FIX = Path(__file__).parent / "fixtures" / "devices"
REQUIRED = ["apple-m1", "apple-m2-pro", "apple-m3-max", "apple-m4-max", "apple-m2-ultra",
            "apple-m3-ultra", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb",
            "jetson-agx-orin-64gb", "rtx-3060-12gb", "rtx-3090", "rtx-4090", "a100-80gb",
            "h100-80gb", "h200", "raspberry-pi-5", "generic-x86_64", "generic-arm64",
            "generic-nvidia"]


def _read(name: str) -> str:
    return (FIX / name).read_bytes().replace(b"\0", b"").decode()


def test_all_profiles_load_and_cite_sources():
    profiles = load_profiles()
    assert set(REQUIRED) <= set(profiles)
    for stem, p in profiles.items():
        assert p.source and p.bandwidth_gbps > 0 and p.memory_gb > 0, stem
        assert "spec" in p.source.lower() or "sheet" in p.source.lower() or \
            "measured" in p.source.lower() or "fallback" in p.source.lower() or \
            "brief" in p.source.lower() or "whitepaper" in p.source.lower() or \
            "announcement" in p.source.lower() or "release" in p.source.lower(), stem


GOOD = """
name = "X"
kind = "cpu"
backend = "torch"
memory_gb = 8
usable_fraction = 0.5
bandwidth_gbps = 10.0
source = "test"
[match]
arch = ["x86_64"]
"""


def test_strict_parsing_names_file_and_key():
    assert parse_profile(GOOD, "x.toml").memory_gb == 8.0
    with pytest.raises(ProfileError, match=r"bad\.toml: unknown key 'bandwith_gbps'"):
        parse_profile(GOOD.replace("bandwidth_gbps", "bandwith_gbps"), "bad.toml")
    with pytest.raises(ProfileError, match=r"bad\.toml: key 'memory_gb' must be float"):
        parse_profile(GOOD.replace("memory_gb = 8", 'memory_gb = "8"'), "bad.toml")
    with pytest.raises(ProfileError, match=r"bad\.toml: missing key 'source'"):
        parse_profile(GOOD.replace('source = "test"', ""), "bad.toml")
    with pytest.raises(ProfileError, match=r"unknown key 'match.gpu'"):
        parse_profile(GOOD + 'gpu = ["x"]\n', "bad.toml")
    with pytest.raises(ProfileError, match="usable_fraction"):
        parse_profile(GOOD.replace("0.5", "1.5"), "bad.toml")
    with pytest.raises(ProfileError, match="not valid TOML"):
        parse_profile("name = ", "bad.toml")


def test_a_typo_in_the_folder_is_an_error(tmp_path):
    (tmp_path / "ok.toml").write_text(GOOD)
    (tmp_path / "typo.toml").write_text(GOOD.replace("kind", "knid"))
    with pytest.raises(ProfileError, match=r"typo\.toml: unknown key 'knid'"):
        load_profiles(tmp_path)


def _mac(fixture):
    ctl = parse_sysctl(_read(fixture))
    return Probe("Darwin", "arm64", ctl["machdep.cpu.brand_string"], int(ctl["hw.memsize"]))


@pytest.mark.parametrize("fixture,expected,mem", [
    ("macos-m2-ultra.sysctl", "Apple M2 Ultra", 192.0),
    ("macos-m1.sysctl", "Apple M1", 16.0),
])
def test_detect_macos(fixture, expected, mem):
    found = match(_mac(fixture), load_profiles())
    assert found.profile.name == expected and found.profile.memory_gb == mem


def test_unknown_mac_is_reported_with_what_was_measured():
    found = match(_mac("macos-m1-pro.sysctl"), load_profiles())  # no M1 Pro profile
    assert found.profile is None
    assert "unknown machine" in found.reason and "Apple M1 Pro" in found.reason
    assert "32.0 GiB" in found.reason


def test_detect_jetson_without_nvml():
    probe = Probe("Linux", "aarch64", "ARMv8 Processor rev 1 (v8l)",
                  parse_meminfo(_read("jetson-agx-orin.meminfo")),
                  device_tree_model=_read("jetson-agx-orin.model"),
                  tegra_release=_read("jetson.nv_tegra_release"))
    found = match(probe, load_profiles())
    assert found.profile.name == "NVIDIA Jetson AGX Orin 64GB"
    assert found.profile.backend == "onnxruntime"
    assert 61 < found.profile.memory_gb < 62  # MemTotal, not the nominal 64


def test_detect_nvidia_gpu_uses_vram():
    probe = Probe("Linux", "x86_64", parse_cpuinfo(_read("x86.cpuinfo")),
                  parse_meminfo(_read("x86.meminfo")),
                  gpus=parse_nvidia_smi(_read("rtx3090.nvidia-smi")))
    found = match(probe, load_profiles())
    assert found.profile.name == "NVIDIA GeForce RTX 3090" and found.profile.memory_gb == 24.0


def test_detect_h200_as_captured_on_one():
    gpus = parse_nvidia_smi(_read("h200.nvidia-smi"))  # nvidia-smi's line on an H200 machine
    probe = Probe("Linux", "x86_64", parse_cpuinfo(_read("x86.cpuinfo")),
                  parse_meminfo(_read("x86.meminfo")), gpus=gpus)
    found = match(probe, load_profiles())
    assert found.profile.name == "NVIDIA H200" and found.profile.backend == "torch"
    assert found.profile.memory_gb == pytest.approx(140.4, abs=0.05)


def test_a_gpu_no_profile_names_is_still_planned_as_a_gpu():
    """An NVIDIA card with no profile of its own (a T4, an L40S) gets the low-figured fallback
    and its own VRAM, with torch, where it was taken for the CPU beside it (onnxruntime on
    the CPU, 25 GB/s); named cards keep their own profiles."""
    def probe(smi: str) -> Probe:
        return Probe("Linux", "x86_64", parse_cpuinfo(_read("x86.cpuinfo")),
                     parse_meminfo(_read("x86.meminfo")), gpus=parse_nvidia_smi(smi))

    profiles = load_profiles()
    for smi, gib in (("Tesla T4, 15360", 15.0), ("NVIDIA L40S, 46068", 44.99)):
        found = match(probe(smi), profiles)
        assert found.profile.name == "Generic NVIDIA GPU" and found.profile.kind == "nvidia"
        assert found.profile.backend == "torch" and "calibrate" in found.reason
        assert found.profile.memory_gb == pytest.approx(gib, abs=0.01)
    for smi, name in (("NVIDIA GeForce RTX 3060, 12288", "NVIDIA GeForce RTX 3060 12GB"),
                      ("NVIDIA H200, 143771", "NVIDIA H200"),
                      ("NVIDIA A100-SXM4-80GB, 81920", "NVIDIA A100 80GB")):
        found = match(probe(smi), profiles)
        assert found.profile.name == name and "calibrate" not in found.reason
    assert match(probe(""), profiles).profile.name == "Generic x86-64 CPU"


def test_a_gpu_no_backend_here_can_use_is_planned_as_the_cpu():
    """A GPU beside torch's CPU wheel and onnxruntime's CPU build computes nothing: the
    machine is its CPU (onnxruntime, the CPU's figures), and detection says why."""
    gpus = parse_nvidia_smi("NVIDIA GeForce RTX 3090, 24576")
    assert usable_gpus(gpus, cuda=True) == (gpus, "")
    kept, note = usable_gpus(gpus, cuda=False)
    assert kept == [] and "RTX 3090" in note and "torch without CUDA" in note
    probe = Probe("Linux", "x86_64", parse_cpuinfo(_read("x86.cpuinfo")),
                  parse_meminfo(_read("x86.meminfo")), gpus=kept, note=note)
    found = match(probe, load_profiles())
    assert found.profile.name == "Generic x86-64 CPU" and "RTX 3090" in found.reason


def test_cuda_visible_devices_decides_which_gpus_a_process_has():
    two = [("NVIDIA GeForce RTX 3090", 24 * GB), ("NVIDIA H200", 140 * GB)]
    assert visible_gpus(two, None) == two
    assert visible_gpus(two, "") == [] and visible_gpus(two, "-1") == []
    assert visible_gpus(two, "1") == [two[1]] and visible_gpus(two, "1,0") == two[::-1]
    assert visible_gpus(two, "0,7,1") == [two[0]]  # CUDA stops at the first missing index
    assert visible_gpus(two, "GPU-8a1b") == two  # a UUID: not mapped here
    # a process told to use no GPU is planned as its CPU, not as the GPU nvidia-smi lists
    probe = Probe("Linux", "x86_64", parse_cpuinfo(_read("x86.cpuinfo")),
                  parse_meminfo(_read("x86.meminfo")), gpus=visible_gpus(two, ""))
    assert match(probe, load_profiles()).profile.name == "Generic x86-64 CPU"


def test_detect_plain_cpu_and_pi():
    x86 = Probe("Linux", "x86_64", parse_cpuinfo(_read("x86.cpuinfo")),
                parse_meminfo(_read("x86.meminfo")))
    found = match(x86, load_profiles())
    assert found.profile.name == "Generic x86-64 CPU"
    assert found.profile.memory_gb == pytest.approx(62.74, abs=0.01)
    assert parse_cpuinfo(_read("x86.cpuinfo")).startswith("AMD Ryzen 9")
    pi = Probe("Linux", "aarch64", parse_cpuinfo(_read("pi5.cpuinfo")),
               parse_meminfo(_read("pi5.meminfo")), device_tree_model=_read("pi5.model"))
    assert match(pi, load_profiles()).profile.name == "Raspberry Pi 5"


def test_plan_across_mac_jetson_gpu_pi_is_sensible():
    p = load_profiles()
    nodes = [NodeCapacity(stem, p[stem].usable_bytes, p[stem].bandwidth_gbps, p[stem].name,
                          p[stem].fp16_tflops)
             for stem in ("apple-m2-ultra", "jetson-agx-orin-64gb", "rtx-3090",
                          "raspberry-pi-5")]
    # a Llama-70B-class model in fp16: 80 layers of 1.7 GB
    cost = ModelCost(1_712_000_000, 80, 40 * 2 ** 20, 2 * 2 ** 30, 2 * 2 ** 30,
                     layer_flops=1.7e9)
    out = plan(cost, nodes)
    layers = {a.node: len(a.layers) for a in out}
    assert layers.get("raspberry-pi-5", 0) == min([layers.get("raspberry-pi-5", 0),
                                                   *layers.values()])
    assert "raspberry-pi-5" in out.excluded and "slower" in out.excluded["raspberry-pi-5"]
    assert "left out: raspberry-pi-5" in format_plan(out)
    assert layers["rtx-3090"] <= p["rtx-3090"].usable_bytes // cost.per_layer
    assert layers["apple-m2-ultra"] > layers["jetson-agx-orin-64gb"]


def test_profile_round_trips_through_toml():
    prof = load_profiles()["rtx-3090"]
    again = parse_profile(to_toml(prof), "rt.toml")
    assert again == prof.__class__(**{**prof.__dict__, "path": "rt.toml"})


@pytest.mark.real
def test_calibrate_writes_a_profile_that_loads(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "devices" / "this-box.toml"
    r = subprocess.run([sys.executable, "-m", "mesh", "devices", "calibrate", "--write",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    prof = parse_profile(out.read_text(), str(out))
    a = np.ones(256 * 1024 * 1024 // 4, dtype=np.float32)
    a.sum()
    t = time.perf_counter()
    a.sum()
    direct = a.nbytes / (time.perf_counter() - t) / 1e9
    assert direct / 2 <= prof.bandwidth_gbps <= direct * 2, (prof.bandwidth_gbps, direct)
    assert "measured by mesh devices calibrate" in prof.source
    assert prof.memory_gb > 0 and prof.fp16_tflops > 0
    assert "calibrating" in r.stderr  # progress was shown
    # the new profile joins the others and this machine now matches it
    from mesh.devices.detect import probe_local

    folder = out.parent
    found = match(probe_local(), load_profiles(folder))
    assert found.profile is not None and found.profile.name == prof.name
    assert GB > 0
