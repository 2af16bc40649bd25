"""fastws inside a Python program (fastws/embed.py): Proxy in the caller's event loop, serve()
with its master and workers, a configuration as a path or a dict."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

import fastws
from fastws.errors import ConfigError
from support import EchoBackend, free_port, to_toml, wait_port, wait_until


def config(port: int, backend: str) -> dict[str, Any]:
    return {"upstream": [{"name": "app", "servers": [backend]}],
            "server": [{"listen": [f"127.0.0.1:{port}"],
                        "location": [{"path": "/ws", "proxy_pass": "app"},
                                     {"path": "= /status", "status": "json"}]}]}


def test_a_proxy_runs_in_the_callers_event_loop(echo_backend: EchoBackend) -> None:
    port = free_port()

    async def main() -> tuple[list[tuple[str, int]], str, int]:
        async with fastws.Proxy(config(port, echo_backend.address)) as proxy:
            addresses = proxy.addresses
            async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send("hello")
                answer = await ws.recv()
                tunnels = proxy.stats()["tunnels_active"]
        return addresses, str(answer), tunnels

    addresses, answer, tunnels = asyncio.run(main())
    assert addresses == [("127.0.0.1", port)] and answer == "hello" and tunnels == 1
    # closed: nothing listens there any more (SO_REUSEADDR: the tunnel's TIME_WAIT may stay)
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_a_proxy_reads_a_configuration_file(tmp_path: Path, echo_backend: EchoBackend) -> None:
    port = free_port()
    path = tmp_path / "fastws.toml"
    path.write_text(to_toml(config(port, echo_backend.address)))

    async def main() -> str:
        proxy = fastws.Proxy(path)
        await proxy.start()
        try:
            async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send("from a file")
                return str(await ws.recv())
        finally:
            await proxy.close(graceful=True)

    assert asyncio.run(main()) == "from a file"


def test_a_configuration_mistake_raises_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        fastws.Proxy({"server": [{"listen": ["127.0.0.1:80"], "location": [{"path": "/"}]}]})
    assert str(err.value).startswith("<dict>: server[0].location['/'].proxy_pass: ")


def test_a_proxy_that_cannot_listen_says_so(echo_backend: EchoBackend) -> None:
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)

    async def main() -> None:
        await fastws.Proxy(config(port, echo_backend.address)).start()

    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            asyncio.run(main())
    finally:
        taken.close()


def test_serve_runs_workers_from_a_dict_and_reloads_it(tmp_path: Path,
                                                       echo_backend: EchoBackend) -> None:
    port = free_port()
    cfg = config(port, echo_backend.address)
    cfg["processes"] = 2
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import fastws
        sys.exit(fastws.serve(json.loads({json.dumps(json.dumps(cfg))})))
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)

        def workers() -> list[int]:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]

        wait_until(lambda: len(workers()) == 2)
        first = set(workers())

        async def echo() -> str:
            async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send("served")
                return str(await ws.recv())

        assert asyncio.run(echo()) == "served"
        proc.send_signal(signal.SIGHUP)      # the dict is checked again, new workers start
        wait_until(lambda: len(set(workers()) - first) == 2 and len(workers()) == 2)
        assert asyncio.run(echo()) == "served"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert "Traceback" not in out and "still held" not in out, out
