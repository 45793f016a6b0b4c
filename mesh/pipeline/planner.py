"""Layer placement: a pure function from model cost and node capacities to layer ranges.

Each node gets a share of the layers proportional to its speed (memory bandwidth: decode reads
every weight once per token), capped by what fits in its usable memory (weights plus the KV
cache for the configured context, the embedding on the first node and the head on the last);
the last node's share is cut by the time its output head takes, so every stage takes as long
per token under load.
Every node gets one layer, the rest are water-filled around the caps by speed and rounded by
largest remainder (exo's allocation does the same), so a faster node never gets fewer layers
than a slower one with the same memory (the last node's head aside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.errors import ModelTooLarge
from mesh.layers import LayerRange
from mesh.models import arch

GB = 1024 ** 3


SLOW_FACTOR = 8.0  # a node this many times slower per layer than the fastest is left out
                   # when the others can hold the model: its layers would dominate each token


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    usable_bytes: int
    bandwidth_gbps: float
    device: str = ""
    tflops: float = 0.0  # 0: unknown, bandwidth alone sets the speed


class Plan(list):
    """The assignments, in order, plus why any node was left out."""

    def __init__(self, assignments=(), excluded: dict[str, str] | None = None):
        super().__init__(assignments)
        self.excluded = excluded or {}


@dataclass(frozen=True)
class ModelCost:
    layer_bytes: int  # weights of one decoder layer (the largest, if they differ)
    num_layers: int
    kv_bytes_per_layer: int  # KV cache of one layer at the planned context
    embed_bytes: int  # token embedding (first stage)
    head_bytes: int  # final norm + output head (last stage; a copy of the embedding if tied)
    layer_flops: float = 0.0  # per decoded token: about 2 x parameters
    head_flops: float = 0.0  # the output head's, likewise (0: unknown)

    @property
    def per_layer(self) -> int:
        return self.layer_bytes + self.kv_bytes_per_layer


@dataclass(frozen=True)
class Assignment:
    node: str
    layers: LayerRange
    bytes_used: int
    usable_bytes: int
    ms_per_token: float
    device: str = ""


def _caps(cost: ModelCost, nodes: list[NodeCapacity]) -> list[int]:
    caps = []
    for i, n in enumerate(nodes):
        extra = (cost.embed_bytes if i == 0 else 0) + (cost.head_bytes if i == len(nodes) - 1
                                                       else 0)
        caps.append(max(0, (n.usable_bytes - extra) // cost.per_layer))
    return caps


def layer_seconds(cost: ModelCost, n: NodeCapacity) -> float:
    """Time for one layer per decoded token: memory-bound unless compute is slower."""
    t = cost.layer_bytes / (max(n.bandwidth_gbps, 1e-6) * 1e9)
    if n.tflops > 0 and cost.layer_flops:
        t = max(t, cost.layer_flops / (n.tflops * 1e12))
    return t


def observed_bandwidth(cost: ModelCost, layers: int, ms_per_token: float,
                       profile_gbps: float, weight: float = 0.7) -> float:
    """Correct a profile's bandwidth with a node's measured decode time for ``layers`` layers
    (node-side forward time per token, from live steps); ``weight`` is the trust in the
    measurement."""
    if ms_per_token <= 0 or layers <= 0:
        return profile_gbps
    measured = layers * cost.layer_bytes / (ms_per_token / 1e3) / 1e9
    return weight * measured + (1 - weight) * profile_gbps


def _shares(total: int, weights: list[float], caps: list[int]) -> list[float]:
    """Split ``total`` in proportion to ``weights`` without exceeding ``caps`` (water-fill)."""
    shares = [0.0] * len(weights)
    active = [i for i in range(len(weights)) if caps[i] > 0]
    left = float(total)
    while active and left > 1e-9:
        wsum = sum(weights[i] for i in active)
        over = [i for i in active if left * weights[i] / wsum > caps[i] - 1e-9]
        if not over:
            for i in active:
                shares[i] = left * weights[i] / wsum
            break
        for i in over:
            shares[i] = float(caps[i])
            left -= caps[i]
            active.remove(i)
    return shares


def _round(total: int, shares: list[float], caps: list[int], weights: list[float]) -> list[int]:
    counts = [min(int(math.floor(s + 1e-9)), c) for s, c in zip(shares, caps)]
    left = total - sum(counts)
    order = sorted(range(len(shares)),
                   key=lambda i: (-(shares[i] - counts[i]), -weights[i], i))
    while left > 0:
        progressed = False
        for i in order:
            if left and counts[i] < caps[i]:
                counts[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return counts


def _balanced_shares(cost: ModelCost, total: int, weights: list[float],
                     caps: list[int]) -> list[float]:
    """``_shares`` such that every node takes as long per token, the last node's output head
    included, so it gets fewer layers. Under load each stage works on its own micro-batch
    and the slowest stage sets the pipeline's tokens/s; a batch of decode steps is bound by
    arithmetic, not by reading the weights, so the head counts as ``head_flops /
    layer_flops`` layers (SmolLM2's tied 49K-token head: 8 layers' worth; Gemma 3 270M's
    262K-token head more than all its layers), or by bytes where the flops are unknown."""
    head = 0.0
    if len(weights) > 1:
        if cost.head_flops and cost.layer_flops:
            head = cost.head_flops / cost.layer_flops
        elif cost.layer_bytes:
            head = cost.head_bytes / cost.layer_bytes
    if head <= 0:
        return _shares(total, weights, caps)
    shares = _shares(total + head, weights, caps[:-1] + [caps[-1] + head])
    shares[-1] -= head
    if shares[-1] >= 0:
        return shares
    # the head alone outweighs the last node's share: the others take what they can hold
    shares = _shares(total, weights[:-1], caps[:-1]) + [0.0]
    shares[-1] = min(float(caps[-1]), total - sum(shares))
    return shares


def plan(cost: ModelCost, nodes: list[NodeCapacity]) -> list[Assignment]:
    """Half-open layer ranges, in node order, covering every layer exactly once.

    Every node that stays in the pipeline gets at least one layer; nodes that cannot hold
    one, and the slowest nodes when there are more nodes than layers, are left out. Raises
    ``ModelTooLarge`` naming how much memory is missing when the nodes cannot hold the model.
    """
    if not nodes:
        raise ModelTooLarge("no nodes to place the model on", code="no_nodes")
    if len({n.name for n in nodes}) != len(nodes):
        raise ValueError("node names must be unique")
    active = list(nodes)
    excluded: dict[str, str] = {}
    while True:
        caps = _caps(cost, active)
        speed = [1.0 / layer_seconds(cost, n) for n in active]
        slowest = min(range(len(active)), key=lambda i: (speed[i], -i))
        if len(active) > cost.num_layers:
            excluded[active[slowest].name] = "more nodes than layers; slowest left out"
            del active[slowest]
            continue
        empty = [i for i, c in enumerate(caps) if c == 0]
        if empty and len(empty) < len(active):
            for i in empty:
                excluded[active[i].name] = "cannot hold one layer (plus embedding/head)"
            active = [n for i, n in enumerate(active) if i not in empty]
            continue
        ratio = max(speed) / speed[slowest]
        if len(active) > 1 and ratio > SLOW_FACTOR:
            rest = active[:slowest] + active[slowest + 1:]
            if sum(_caps(cost, rest)) >= cost.num_layers:
                excluded[active[slowest].name] = (
                    f"{ratio:.0f}x slower per layer than the fastest node and not needed "
                    "for memory")
                active = rest
                continue
        break
    if sum(caps) < cost.num_layers:
        missing = (cost.num_layers - sum(caps)) * cost.per_layer
        have = sum(n.usable_bytes for n in active)
        raise ModelTooLarge(
            f"the model needs about {(have + missing) / GB:.2f} GiB but the "
            f"{len(active)} node(s) can use {have / GB:.2f} GiB: "
            f"{missing / GB:.2f} GiB missing", code="model_too_large")
    weights = [1.0 / layer_seconds(cost, n) for n in active]
    rest = cost.num_layers - len(active)  # one layer each first, the rest by speed
    extra_caps = [c - 1 for c in caps]
    counts = [1 + c for c in _round(rest, _balanced_shares(cost, rest, weights, extra_caps),
                                    extra_caps, weights)]
    out, start = [], 0
    for i, (n, c) in enumerate(zip(active, counts)):
        extra = (cost.embed_bytes if i == 0 else 0) + (cost.head_bytes
                                                       if i == len(active) - 1 else 0)
        used = c * cost.per_layer + extra
        # bytes streamed per decoded token: the layers and the head (an embedding lookup
        # reads one row)
        head = cost.head_bytes if i == len(active) - 1 else 0
        ms = (c * layer_seconds(cost, n) + head / (n.bandwidth_gbps * 1e9)) * 1e3
        out.append(Assignment(n.name, LayerRange(start, start + c, cost.num_layers), used,
                              n.usable_bytes, ms, n.device))
        start += c
    return Plan(out, excluded)


def model_cost(source, dtype_bytes: float, context: int, quantized: bool = False,
               tensor_bytes=None) -> ModelCost:
    """Per-layer weight and KV bytes of a ``ModelSource`` at ``dtype_bytes`` per parameter;
    with ``quantized``, tensors a file stores quantized count the bytes of their blocks (what
    a backend holding the file's own precision keeps), and the KV cache is fp32;
    ``tensor_bytes(name, numel)``, where given, is what a tensor costs (None: as above)."""
    cfg = source.config
    n = source.num_layers
    reader = source.reader
    per_layer: dict[int, int] = {}
    params: dict[int, int] = {}
    embed = head = head_params = embed_params = 0
    for name in reader.names():
        numel = math.prod(reader.shape(name))
        b = int(numel * dtype_bytes)
        if quantized and hasattr(reader, "info"):
            b = int(reader.info(name).n_bytes)
        if tensor_bytes is not None:
            b = tensor_bytes(name, numel) or b
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            per_layer[i] = per_layer.get(i, 0) + b
            params[i] = params.get(i, 0) + numel
        elif name == "model.embed_tokens.weight":
            embed, embed_params = b, numel
        else:
            head += b
            head_params += numel
    if cfg.get("tie_word_embeddings"):
        head += embed
        head_params += embed_params
    kv = int(2 * arch.kv_heads(cfg) * arch.head_dim(cfg) * context
             * (4 if quantized else max(dtype_bytes, 2)))
    layer = max(per_layer.values())
    return ModelCost(layer, n, kv, embed, head, layer_flops=2.0 * max(params.values()),
                     head_flops=2.0 * head_params)


def format_plan(assignments: list[Assignment]) -> str:
    excluded = getattr(assignments, "excluded", {})
    rows = [("node", "device", "layers", "memory used / usable", "ms/token")]
    for a in assignments:
        rows.append((a.node, a.device or "-", f"{a.layers} ({len(a.layers)})",
                     f"{a.bytes_used / GB:.2f} / {a.usable_bytes / GB:.2f} GiB",
                     f"{a.ms_per_token:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(a.ms_per_token for a in assignments)
    lines.append(f"expected decode (compute only): {total:.2f} ms/token, "
                 f"{1000 / total if total else 0:.0f} tokens/s")
    for name, why in excluded.items():
        lines.append(f"left out: {name}: {why}")
    return "\n".join(lines)
