"""A network link's delay, for benchmarks on one machine: a TCP relay that holds every byte
it carries, each way, for half a round-trip time before passing it on, in order.

`tc netem` does this in the kernel; some kernels ship without it (this CI box's does), and
loopback's ~0.05 ms round trip hides what a LAN's costs a protocol that waits on one. The
relay adds its own copying (a Python process) and no bandwidth limit.

    python benchmarks/link.py --rtt 1.0 HOST:PORT [HOST:PORT ...]

prints, for each target, the loopback address that reaches it through the delay (one line
each, in order), then relays until it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys


async def _carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 delay: float) -> None:
    """Bytes from ``reader`` to ``writer``, each chunk ``delay`` seconds after it came."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(1 << 16)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        pass
    finally:
        sender.cancel()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def relay(targets: list[tuple[str, int]], rtt_ms: float) -> None:
    delay = rtt_ms / 2000.0

    def handler(host: str, port: int):
        async def on_client(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection(host, port)
            except OSError:
                cw.close()
                return
            _nodelay(cw)
            _nodelay(uw)
            try:
                await asyncio.gather(_carry(cr, uw, delay), _carry(ur, cw, delay))
            finally:
                for w in (cw, uw):
                    w.close()
        return on_client

    servers = []
    for host, port in targets:
        srv = await asyncio.start_server(handler(host, port), "127.0.0.1", 0)
        servers.append(srv)
        print(f"127.0.0.1:{srv.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt", type=float, required=True, help="round-trip time added, ms")
    ap.add_argument("targets", nargs="+", help="HOST:PORT")
    args = ap.parse_args()
    targets = []
    for t in args.targets:
        host, _, port = t.rpartition(":")
        if not host or not port.isdigit():
            sys.exit(f"link.py: not HOST:PORT: {t}")
        targets.append((host, int(port)))
    try:
        asyncio.run(relay(targets, args.rtt))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
