"""`fastws demo`: a WebSocket echo backend on localhost with fastws in front of it."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading

from .config import from_dict
from .worker import Worker, open_listeners


def _echo_backend(sock: socket.socket, started: threading.Event) -> None:
    from websockets.asyncio.server import serve

    from websockets.exceptions import ConnectionClosed

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass

    async def main() -> None:
        async with serve(echo, sock=sock, max_size=None, compression=None,
                         logger=_quiet_logger()):
            started.set()
            await asyncio.Future()

    asyncio.run(main())


def run_demo(port: int) -> int:
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend_port = backend.getsockname()[1]
    cfg = from_dict({
        "upstream": [{"name": "echo", "servers": [f"127.0.0.1:{backend_port}"]}],
        "server": [{
            "listen": [f"127.0.0.1:{port}"],
            # relay = "splice": every byte of the demo's tunnels moves through splice(2)
            "location": [{"path": "/ws", "proxy_pass": "echo", "relay": "splice"},
                         {"path": "= /", "return": [200, "fastws demo: open ws://127.0.0.1:"
                                                    f"{port}/ws\n"]}],
        }],
    }, "<demo>")
    try:
        sockets = open_listeners(cfg)
    except OSError as exc:
        print(f"fastws: cannot listen: {exc.strerror or exc} (try: fastws demo --port 8081)",
              file=sys.stderr)
        return 1
    started = threading.Event()
    threading.Thread(target=_echo_backend, args=(backend, started), daemon=True).start()
    started.wait(10)
    url = f"ws://127.0.0.1:{port}/ws"

    def ready(worker: Worker) -> None:
        print(f"fastws demo: proxy on {url} -> WebSocket echo backend on 127.0.0.1:{backend_port}")
        print("Try it (in another terminal):")
        print(f"  fastws client {url} hello")
        print(f"or interactively:  python -m websockets {url}")
        print("Ctrl-C stops both.", flush=True)

    worker = Worker(cfg, sockets)
    worker.ready = ready
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    stats = worker.engine.stats() if worker.engine is not None else {}
    tunnels = stats.get("tunnels_total", 0)
    print(f"\nfastws demo: stopped; {tunnels} tunnel{'' if tunnels == 1 else 's'} relayed, "
          f"{stats.get('bytes_spliced', 0)} bytes by splice(2), "
          f"{stats.get('bytes_copied', 0)} by copy", flush=True)
    return 0


def run_client(url: str, messages: list[str]) -> int:
    """Send each message to `url` and print what comes back (a small diagnostic client)."""
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    try:
        with connect(url, open_timeout=10, max_size=None) as ws:
            for message in messages:
                ws.send(message)
                print(ws.recv(timeout=10))
    except (OSError, TimeoutError, WebSocketException) as exc:
        print(f"fastws client: {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _quiet_logger() -> logging.Logger:
    logger = logging.getLogger("fastws.demo")
    logger.setLevel(logging.WARNING)
    return logger
