"""What a pipeline node holding k of N layers keeps resident, on a Llama-3.2-1B-shaped GGUF.

Each stage is loaded in a fresh process (``--child``), runs one 16-token forward, and reports
its resident memory beside the file's bytes for its layers. The fixed overhead is the
resident memory of the same process before the shard loads (interpreter, NumPy, the backend's
module and libraries imported). The issue's bound: resident <= k/N x the file's layer bytes x 1.15 + fixed.

    python benchmarks/node_memory.py [--backend onnxruntime] [--stages 0:1 4:6 4:8 0:4 12:16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str, backend: str, start: int, end: int) -> None:
    import numpy as np

    import importlib

    from mesh.backends import StepItem, load_shard
    from mesh.backends.base import _SHARD_CLASSES
    from mesh.layers import LayerRange
    from mesh.models.source import resolve

    importlib.import_module(_SHARD_CLASSES[backend][0])  # its libraries count as fixed
    src = resolve(path, progress=False)
    fixed = _rss()
    n = src.num_layers
    layers = LayerRange(start, end, n)
    shard = load_shard(backend, src, layers, "auto")
    data = (np.arange(16, dtype=np.int32) if layers.is_first
            else np.zeros((16, src.hidden_size), np.float32))
    shard.forward([StepItem("m", data, shard.new_cache())])
    layer_bytes = sum(src.reader.info(t).n_bytes for t in src.tensor_names(layers)
                      if t.startswith("model.layers."))
    other = sum(src.reader.info(t).n_bytes for t in src.tensor_names(layers)
                if not t.startswith("model.layers."))
    print(json.dumps({"fixed": fixed, "rss": _rss(), "layer_bytes": layer_bytes,
                      "other_bytes": other, "n": n}))


def measure(path: str, backend: str, start: int, end: int) -> dict:
    env = dict(os.environ, MESH_NO_OPENBLAS="1")
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", path, backend,
                        str(start), str(end)], capture_output=True, text=True, env=env,
                       timeout=900)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr else "child failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--stages", nargs="*", default=["4:5", "4:6", "4:8", "0:4", "12:16"])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
    from benchmarks.synthetic import build
    from mesh.models import registry

    path = str(build(registry.mesh_home() / "synthetic"))
    mb = 1e6
    print(f"{Path(path).name} ({os.path.getsize(path) / mb:.0f} MB), backend {args.backend}")
    print(f"{'layers':>8} {'file layer MB':>14} {'other MB':>9} {'fixed MB':>9} "
          f"{'resident MB':>12} {'(rss - fixed) / file':>21}")
    for stage in args.stages:
        a, b = (int(x) for x in stage.split(":"))
        m = measure(path, args.backend, a, b)
        held = m["rss"] - m["fixed"]
        print(f"{stage:>8} {m['layer_bytes'] / mb:>14.0f} {m['other_bytes'] / mb:>9.0f} "
              f"{m['fixed'] / mb:>9.0f} {m['rss'] / mb:>12.0f} "
              f"{held / max(m['layer_bytes'] + m['other_bytes'], 1):>21.3f}")


if __name__ == "__main__":
    main()
