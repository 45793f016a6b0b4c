"""The planner is pure: exhaustive property checks over many random clusters."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mesh.errors import ModelTooLarge
from mesh.pipeline.planner import GB, ModelCost, NodeCapacity, plan

COST = ModelCost(layer_bytes=100 * 2 ** 20, num_layers=30, kv_bytes_per_layer=10 * 2 ** 20,
                 embed_bytes=200 * 2 ** 20, head_bytes=200 * 2 ** 20)


def _check(cost, nodes, out):
    # every layer exactly once, contiguous, in node order, no empty stage
    assert out[0].layers.start == 0 and out[-1].layers.end == cost.num_layers
    for a, b in zip(out, out[1:]):
        assert a.layers.end == b.layers.start
    assert sum(len(a.layers) for a in out) == cost.num_layers
    names = [n.name for n in nodes]
    assert [names.index(a.node) for a in out] == sorted(names.index(a.node) for a in out)
    for a in out:
        assert len(a.layers) >= 1
        assert a.bytes_used <= a.usable_bytes, a


def test_random_clusters_properties():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(3000):
        n = int(rng.integers(1, 7))
        layers = int(rng.integers(1, 80))
        cost = ModelCost(int(rng.integers(1, 500)) * 2 ** 20, layers,
                         int(rng.integers(0, 50)) * 2 ** 20, int(rng.integers(0, 800)) * 2 ** 20,
                         int(rng.integers(0, 800)) * 2 ** 20)
        nodes = [NodeCapacity(f"n{i}", int(rng.uniform(0.1, 24) * GB),
                              float(rng.choice([10, 25, 50, 100, 400, 800])))
                 for i in range(n)]
        try:
            out = plan(cost, nodes)
        except ModelTooLarge as exc:
            assert "missing" in exc.message
            # it really does not fit (up to one layer of rounding per node)
            need = layers * cost.per_layer + cost.embed_bytes + cost.head_bytes
            assert sum(x.usable_bytes for x in nodes) < need + n * cost.per_layer
            continue
        _check(cost, nodes, out)
        checked += 1
    assert checked > 1000


def test_faster_node_never_gets_fewer_layers_at_equal_memory():
    for bws in itertools.product([10, 25, 50, 100, 200], repeat=3):
        nodes = [NodeCapacity(f"n{i}", 64 * GB, float(bw)) for i, bw in enumerate(bws)]
        out = {a.node: len(a.layers) for a in plan(COST, nodes)}
        for a, b in itertools.permutations(range(3), 2):
            if bws[a] > bws[b]:
                assert out.get(f"n{a}", 0) >= out.get(f"n{b}", 0), (bws, out)


def test_equal_nodes_take_equal_time_and_memory_caps_bind():
    nodes = [NodeCapacity(f"n{i}", 64 * GB, 50.0) for i in range(3)]
    # the last node's head (200 MiB) takes as long as two of its 100 MiB layers
    out = plan(COST, nodes)
    assert [len(a.layers) for a in out] == [11, 11, 8]
    assert max(a.ms_per_token for a in out) - min(a.ms_per_token for a in out) \
        <= 100 * 2 ** 20 / 50e9 * 1e3 + 1e-9  # within one layer's time
    no_head = ModelCost(COST.layer_bytes, 30, COST.kv_bytes_per_layer, COST.embed_bytes, 0)
    assert [len(a.layers) for a in plan(no_head, nodes)] == [10, 10, 10]
    # a fast node that can only hold 5 layers gets exactly its cap
    small = [NodeCapacity("fast", 200 * 2 ** 20 + 5 * COST.per_layer, 1000.0),
             NodeCapacity("slow", 64 * GB, 10.0)]
    out = plan(COST, small)
    assert [len(a.layers) for a in out] == [5, 25]


def test_a_head_heavier_than_a_fair_share_leaves_the_last_node_one_layer():
    """Gemma 3 270M: its 262K-token head outweighs all 18 layers. Two equal nodes: the
    last keeps one layer beside the head; the first takes the rest."""
    gemma = ModelCost(layer_bytes=4 * 2 ** 20, num_layers=18, kv_bytes_per_layer=2 ** 20,
                      embed_bytes=160 * 2 ** 20, head_bytes=160 * 2 ** 20)
    nodes = [NodeCapacity(f"n{i}", 64 * GB, 50.0) for i in range(2)]
    assert [len(a.layers) for a in plan(gemma, nodes)] == [17, 1]
    # unless the first cannot hold them: the last takes what the first cannot
    first = 160 * 2 ** 20 + 12 * gemma.per_layer
    capped = [NodeCapacity("n0", first, 50.0), NodeCapacity("n1", 64 * GB, 50.0)]
    assert [len(a.layers) for a in plan(gemma, capped)] == [12, 6]


def test_model_too_large_names_missing_memory():
    nodes = [NodeCapacity("a", 1 * GB, 50.0), NodeCapacity("b", 1 * GB, 50.0)]
    big = ModelCost(200 * 2 ** 20, 30, 0, 0, 0)  # 6 GiB of layers on 2 GiB
    with pytest.raises(ModelTooLarge, match=r"3\.91 GiB missing"):
        plan(big, nodes)


def test_useless_nodes_are_dropped():
    nodes = [NodeCapacity("big", 64 * GB, 100.0), NodeCapacity("tiny", 50 * 2 ** 20, 100.0)]
    out = plan(COST, nodes)
    assert [a.node for a in out] == ["big"] and len(out[0].layers) == 30
    two = ModelCost(100 * 2 ** 20, 2, 0, 0, 0)
    many = [NodeCapacity(f"n{i}", 64 * GB, float(10 + i)) for i in range(4)]
    assert [a.node for a in plan(two, many)] == ["n2", "n3"]  # the two fastest


def test_observed_speed_corrects_profile_bandwidth():
    from mesh.pipeline.planner import observed_bandwidth

    # 10 layers of 100 MiB decoded in 20 ms -> 52 GB/s measured
    bw = observed_bandwidth(COST, 10, 20.0, profile_gbps=200.0, weight=1.0)
    assert bw == pytest.approx(10 * COST.layer_bytes / 0.020 / 1e9)
    assert observed_bandwidth(COST, 10, 0.0, 200.0) == 200.0
    mixed = observed_bandwidth(COST, 10, 20.0, 200.0, weight=0.5)
    assert bw < mixed < 200.0


def test_replanner_learns_measured_speeds():
    from types import SimpleNamespace

    from mesh.layers import LayerRange
    from mesh.pipeline.coordinator import Candidate, Replanner
    from mesh.pipeline.planner import Assignment

    cfg = {"num_hidden_layers": 4, "hidden_size": 8, "num_attention_heads": 2,
           "num_key_value_heads": 1, "tie_word_embeddings": True}
    shapes = {f"model.layers.{i}.w": (1000, 1000) for i in range(4)}
    shapes["model.embed_tokens.weight"] = (10, 8)
    reader = SimpleNamespace(names=lambda: list(shapes), shape=lambda n: shapes[n])
    source = SimpleNamespace(config=cfg, num_layers=4, reader=reader)
    cands = [Candidate("a", "x:1", NodeCapacity("a", 64 * GB, 100.0), "torch"),
             Candidate("b", "x:2", NodeCapacity("b", 64 * GB, 100.0), "torch")]
    r = Replanner("m", source, cands, "torch", "float32", None, "float32", 16)
    r.assignments = [Assignment("a", LayerRange(0, 2, 4), 0, 0, 0.0),
                     Assignment("b", LayerRange(2, 4, 4), 0, 0, 0.0)]
    # node a decodes its 2 layers (8 MB) in 1 ms: 8 GB/s measured, far below its profile
    r.stages = {"a": SimpleNamespace(decode_steps=10, decode_ms=10.0),
                "b": SimpleNamespace(decode_steps=0, decode_ms=0.0)}
    r._learn_speeds()
    assert cands[0].capacity.bandwidth_gbps == pytest.approx(0.7 * 8.0 + 0.3 * 100.0)
    assert cands[1].capacity.bandwidth_gbps == 100.0


def test_stages_must_cover_the_model():
    from mesh.layers import LayerRange, check_covering

    check_covering([LayerRange(0, 2, 4), LayerRange(2, 4, 4)])
    for bad in ([LayerRange(0, 2, 4), LayerRange(3, 4, 4)], [LayerRange(1, 4, 4)],
                [LayerRange(0, 3, 4)], []):
        with pytest.raises(ValueError):
            check_covering(bad)


def test_torch_nodes_on_a_gpu_are_told_from_their_device_profiles():
    """torch's auto holds the file's blocks on a CPU and fp16 on CUDA: the plan counts fp16
    when a torch node's profile (by name or file stem) is an NVIDIA GPU or a Jetson, or is a
    profile not known here (the larger holding); other backends' devices play no part."""
    from mesh.pipeline.coordinator import Candidate, torch_on_gpu

    def cand(device, backend="torch"):
        return Candidate("n", "x:1", NodeCapacity("n", 8 * GB, 100.0, device), backend)

    assert not torch_on_gpu([cand("Generic x86-64 CPU"), cand("raspberry-pi-5")])
    assert torch_on_gpu([cand("Generic x86-64 CPU"), cand("NVIDIA GeForce RTX 4090")])
    assert torch_on_gpu([cand("jetson-orin-nano-8gb")])
    assert torch_on_gpu([cand("a box nobody described")])
    assert not torch_on_gpu([cand("NVIDIA GeForce RTX 4090", "onnxruntime")])
    assert not torch_on_gpu([])
