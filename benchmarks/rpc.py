"""Cost of one node RPC on loopback: grpc.aio client vs the sync stub, side by side; and a
call as a unary call vs as a frame on an open Session stream (mesh/node/link.py).

The pipeline coordinator relays every token through each stage with grpc.aio; this measures
how much of the relay is the client library itself (an authenticated Info call, no compute),
and what an End call (no compute) costs each way: the coordinator's steps go as frames.

    python benchmarks/rpc.py [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.devices import detect_local  # noqa: E402
from mesh.node import mesh_pb2, mesh_pb2_grpc  # noqa: E402
from mesh.node.auth import acall, call  # noqa: E402
from mesh.node.link import NodeLink  # noqa: E402
from mesh.node.runner import StageRunner  # noqa: E402
from mesh.node.service import NodeService, create_server  # noqa: E402

SECRET = "bench-secret-of-the-mesh"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    n = ap.parse_args().calls
    server, port = create_server(NodeService(StageRunner("torch"), detect_local("torch")),
                                 "127.0.0.1", 0, SECRET)
    addr = f"127.0.0.1:{port}"

    try:
        stub = mesh_pb2_grpc.NodeStub(grpc.insecure_channel(addr))

        def sync_round() -> float:
            t = time.perf_counter()
            for _ in range(n):
                call(stub.Info, mesh_pb2.InfoRequest(), SECRET, "/mesh.Node/Info", 10)
            return (time.perf_counter() - t) / n * 1e3

        async def aio_round() -> float:
            async with grpc.aio.insecure_channel(addr) as ch:
                a = mesh_pb2_grpc.NodeStub(ch)
                await acall(a.Info, mesh_pb2.InfoRequest(), SECRET, "/mesh.Node/Info", 10)
                t = time.perf_counter()
                for _ in range(n):
                    await acall(a.Info, mesh_pb2.InfoRequest(), SECRET, "/mesh.Node/Info", 10)
                return (time.perf_counter() - t) / n * 1e3

        sync_round()  # warm up
        s, a = [], []
        for _ in range(3):  # interleaved rounds
            s.append(sync_round())
            a.append(asyncio.run(aio_round()))
        print(f"authenticated Info RPC on loopback (signed call, signed reply checked), {n} calls x 3 interleaved rounds (best):")
        print(f"  sync stub   {min(s):.3f} ms/call")
        print(f"  grpc.aio    {min(a):.3f} ms/call   ({min(a) / min(s):.2f}x)")

        async def end_round(sessions: bool) -> float:
            link = NodeLink(addr, SECRET)
            link.sessions = sessions
            req = mesh_pb2.EndRequest(request_id="none")
            await link.call("End", req, 10)  # the channel (and the stream) open
            t = time.perf_counter()
            for _ in range(n):
                await link.call("End", req, 10)
            took = (time.perf_counter() - t) / n * 1e3
            assert (link.frames > 0) == sessions
            await link.close()
            return took

        u, f = [], []
        for _ in range(3):
            u.append(asyncio.run(end_round(False)))
            f.append(asyncio.run(end_round(True)))
        print(f"authenticated End call through NodeLink (grpc.aio), {n} calls x 3 interleaved "
              f"rounds (best):")
        print(f"  unary call            {min(u):.3f} ms/call")
        print(f"  frame on a stream     {min(f):.3f} ms/call   ({min(f) / min(u):.2f}x)")
    finally:
        server.stop(grace=None)


if __name__ == "__main__":
    main()
