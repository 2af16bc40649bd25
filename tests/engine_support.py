"""An engine in the test process: its tables built from a configuration, driven by a thread that
waits in it, as a worker's main loop does; calls into it run on that thread."""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

from fastws import _engine, balancer, config, tables, tls, worker
from support import free_port


class EngineRunner:
    """An engine serving `cfg` (a configuration as a dict) on its own listeners."""

    def __init__(self, cfg: dict[str, Any], **engine_options: Any) -> None:
        self.config = config.from_dict(cfg)
        self.sockets = worker.open_listeners(self.config)
        self.port = self.sockets[0].getsockname()[1]
        self.groups = balancer.build_upstreams(self.config)
        self.messages: list[tuple[int, str]] = []
        self.engine = _engine.Engine(self, **engine_options)
        self.engine.load(tables.build(self.config, self.sockets, self.groups,
                                      tls.Contexts(self.config)))
        self._calls: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self.engine.watch_control(self._wake_r)
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # what the engine asks of its control plane
    def log(self, level: int, text: str) -> None:
        self.messages.append((level, text))

    def status_page(self, fmt: str) -> tuple[int, str, bytes]:
        return 200, "text/plain", f"status {fmt}\n".encode()

    def _run(self) -> None:
        while self._running:
            if self.engine.wait(0.05):
                os.read(self._wake_r, 4096)
            while True:
                try:
                    fn, result = self._calls.get_nowait()
                except queue.Empty:
                    break
                try:
                    result.put((True, fn()))
                except BaseException as exc:            # handed to the caller
                    result.put((False, exc))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn() on the engine's thread, between two turns; its result or its exception."""
        result: queue.Queue[Any] = queue.Queue()
        self._calls.put((fn, result))
        os.write(self._wake_w, b"x")
        ok, value = result.get(timeout=10)
        if not ok:
            raise value
        return value

    def stats(self) -> dict[str, Any]:
        return self.call(self.engine.stats)

    def close(self) -> None:
        if not self._running:
            return
        self.call(self.engine.stop)
        self._running = False
        os.write(self._wake_w, b"x")
        self._thread.join(10)
        for sock in self.sockets:
            sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        held = self.engine.stats()["held"]
        assert not any(held.values()), held


def tunnel_config(upstream: str, **location: Any) -> dict[str, Any]:
    # these tunnels carry arbitrary bytes, not WebSocket frames: relayed blind (test_frames.py
    # runs tunnels that follow their frames); the listener on a free port (EngineRunner.port)
    loc = {"path": "/", "proxy_pass": "backend", "frames": False}
    loc.update(location)
    return {"upstream": [{"name": "backend", "servers": [upstream]}],
            "server": [{"listen": [f"127.0.0.1:{free_port()}"], "location": [loc]}]}


class HeaderBalancer:
    """A custom balancer for the tests: the X-Server request header names the peer's index."""

    def __init__(self, config: Any, peers: list[Any]) -> None:
        self.peers = peers
        self.events: list[tuple[str, str]] = []

    def select(self, ctx: Any, tried: frozenset[Any]) -> Any:
        peer = self.peers[int(ctx.variable("http_x_server") or 0)]
        return None if peer in tried else peer

    def connected(self, peer: Any) -> None:
        self.events.append(("connected", peer.name))

    def released(self, peer: Any) -> None:
        self.events.append(("released", peer.name))
