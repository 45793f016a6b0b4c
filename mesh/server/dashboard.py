"""The dashboard page (``/dashboard``) and the one JSON document it polls.

The page and its assets ship in the package (``mesh/server/static``: no CDN, it works on a LAN
with no internet). ``/dashboard/state`` turns ``engine.info()`` into the same shape for every
mode: a list of nodes with their layer ranges, memory and recent step times, ensemble members,
events and the token counters the page turns into a live tokens/s.
"""

from __future__ import annotations

import time
from pathlib import Path

STATIC = Path(__file__).parent / "static"


class Dashboard:
    def __init__(self, engine, metrics):
        self.engine, self.metrics = engine, metrics
        self._seen: dict[str, dict] = {}  # last known view of each node, to draw lost ones

    def state(self, status: str) -> dict:
        info = self.engine.info()
        mode = info.get("mode", "local")
        nodes, members = [], []
        if mode == "pipeline":
            for s in info.get("stages", ()):
                node = {"name": s["node"], "address": s.get("address", "local"),
                        "layers": s["layers"], "start": s.get("start"), "end": s.get("end"),
                        "total": info.get("total_layers"), "up": True,
                        "compute_ms": s.get("recent_compute_ms"),
                        "step_ms": s.get("recent_step_ms"),
                        **{k: s.get(k) for k in ("rss_bytes", "kv_bytes", "capacity_bytes")}}
                self._seen[node["name"]] = node
                nodes.append(node)
            current = {n["name"] for n in nodes}
            for name in info.get("lost", ()):
                if name not in current:
                    last = self._seen.get(name, {"name": name, "address": "", "layers": "",
                                                 "start": None, "end": None, "total": None})
                    nodes.append({**last, "up": False, "compute_ms": None, "step_ms": None,
                                  "rss_bytes": None, "kv_bytes": None})
        elif mode == "ensemble":
            lost = set(info.get("lost", ()))
            members = [{**m, "up": True} for m in info.get("members", ())]
            members += [{"name": n, "model": "", "weight": 0.0, "up": False} for n in lost]
            nodes = [{"name": "coordinator", "address": "local", "layers": "", "up": True,
                      "start": None, "end": None, "total": None}]
        else:
            shards = getattr(self.engine, "shards", ())
            total = shards[0].layers.total if shards else None
            nodes = [{"name": "local", "address": "local", "layers": f"[0, {total})",
                      "start": 0, "end": total, "total": total, "up": True,
                      "compute_ms": None, "step_ms": None, **info.get("memory", {})}]
        return {"model": self.engine.model_id, "mode": mode, "status": status,
                "strategy": info.get("strategy"), "running": info.get("running", 0),
                "queued": info.get("queued", 0), "nodes": nodes, "members": members,
                "events": list(info.get("events", ())),
                "generated_tokens": self.metrics.generated, "time": time.monotonic()}
