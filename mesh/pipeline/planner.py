"""Layer placement: a pure function from model cost and node capacities to layer ranges.

Each node gets a share of the layers proportional to its speed (memory bandwidth: decode reads
every weight once per token), capped by what fits in its usable memory (weights plus the KV
cache for the configured context, the embedding on the first node and the head on the last).
Every node gets one layer, the rest are water-filled around the caps by speed and rounded by
largest remainder (exo's allocation does the same), so a faster node never gets fewer layers
than a slower one with the same memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.errors import ModelTooLarge
from mesh.layers import LayerRange

GB = 1024 ** 3


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    usable_bytes: int
    bandwidth_gbps: float
    device: str = ""


@dataclass(frozen=True)
class ModelCost:
    layer_bytes: int  # weights of one decoder layer (the largest, if they differ)
    num_layers: int
    kv_bytes_per_layer: int  # KV cache of one layer at the planned context
    embed_bytes: int  # token embedding (first stage)
    head_bytes: int  # final norm + output head (last stage; a copy of the embedding if tied)

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
    while True:
        caps = _caps(cost, active)
        if len(active) > cost.num_layers:
            slowest = min(range(len(active)), key=lambda i: (active[i].bandwidth_gbps, -i))
            del active[slowest]
            continue
        empty = [i for i, c in enumerate(caps) if c == 0]
        if empty and len(empty) < len(active):
            active = [n for i, n in enumerate(active) if i not in empty]
            continue
        break
    if sum(caps) < cost.num_layers:
        missing = (cost.num_layers - sum(caps)) * cost.per_layer
        have = sum(n.usable_bytes for n in active)
        raise ModelTooLarge(
            f"the model needs about {(have + missing) / GB:.2f} GiB but the "
            f"{len(active)} node(s) can use {have / GB:.2f} GiB: "
            f"{missing / GB:.2f} GiB missing", code="model_too_large")
    weights = [max(n.bandwidth_gbps, 1e-6) for n in active]
    rest = cost.num_layers - len(active)  # one layer each first, the rest by speed
    extra_caps = [c - 1 for c in caps]
    counts = [1 + c for c in _round(rest, _shares(rest, weights, extra_caps), extra_caps,
                                    weights)]
    out, start = [], 0
    for i, (n, c) in enumerate(zip(active, counts)):
        extra = (cost.embed_bytes if i == 0 else 0) + (cost.head_bytes
                                                       if i == len(active) - 1 else 0)
        used = c * cost.per_layer + extra
        # bytes streamed per decoded token: the layers and the head (an embedding lookup
        # reads one row)
        read = c * cost.layer_bytes + (cost.head_bytes if i == len(active) - 1 else 0)
        ms = read / (n.bandwidth_gbps * 1e9) * 1e3
        out.append(Assignment(n.name, LayerRange(start, start + c, cost.num_layers), used,
                              n.usable_bytes, ms, n.device))
        start += c
    return out


def model_cost(source, dtype_bytes: float, context: int) -> ModelCost:
    """Per-layer weight and KV bytes of a ``ModelSource`` at ``dtype_bytes`` per parameter."""
    cfg = source.config
    n = source.num_layers
    per_layer: dict[int, int] = {}
    embed = head = 0
    for name in source.reader.names():
        numel = math.prod(source.reader.shape(name))
        b = int(numel * dtype_bytes)
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            per_layer[i] = per_layer.get(i, 0) + b
        elif name == "model.embed_tokens.weight":
            embed = b
        else:
            head += b
    if cfg.get("tie_word_embeddings"):
        head += embed
    heads_kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = int(2 * heads_kv * head_dim * context * max(dtype_bytes, 2))
    return ModelCost(max(per_layer.values()), n, kv, embed, head)


def format_plan(assignments: list[Assignment]) -> str:
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
    return "\n".join(lines)
