"""How long a whole-model shard takes to load and the process's peak memory while it does,
in a fresh process per backend (run it as a user would start a node: nothing warm).

    python benchmarks/load.py [--model gemma3-270m] [--backend mlx onnxruntime] [--dtype auto]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from mesh.backends import load_shard
from mesh.layers import LayerRange
from mesh.models.source import resolve
src = resolve({model!r}, progress=False); src.tokenizer
t = time.perf_counter()
shard = load_shard({backend!r}, src, LayerRange.full(src.num_layers), {dtype!r})
took = time.perf_counter() - t
status = open('/proc/self/status').read()
kb = lambda key: int(status.split(key + ':')[1].split()[0]) // 1024
print(f"{{took:.2f}} {{kb('VmHWM')}} {{kb('VmRSS')}}")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--backend", nargs="+", default=["mlx", "onnxruntime"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"{args.model}, dtype {args.dtype}, whole model, a fresh process each")
    for _ in range(args.rounds):
        for backend in args.backend:
            code = CHILD.format(root=str(ROOT), model=args.model, backend=backend,
                                dtype=args.dtype)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode:
                print(f"  {backend}: failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            took, peak, held = out.stdout.split()[-3:]
            print(f"  {backend:<12} load {float(took):6.2f} s   peak {peak} MB   "
                  f"resident after {held} MB")


if __name__ == "__main__":
    main()
