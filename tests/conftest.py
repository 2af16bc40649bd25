from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import EchoBackend, Proxy, free_port


@pytest.fixture(scope="module")
def echo_backend() -> Iterator[EchoBackend]:
    backend = EchoBackend()
    yield backend
    backend.close()


@pytest.fixture(params=["io_uring", "epoll"])
def engine(request: pytest.FixtureRequest) -> str:
    """Each proxy a test starts runs on each back end of the engine, as the relay modes."""
    if request.param == "io_uring":
        from fastws import _engine
        try:
            _engine.probe_backend("io_uring")
        except OSError as exc:      # (a kernel before 6.1, or a container that refuses it)
            pytest.skip(f"io_uring is refused here: {exc.strerror}")
    return request.param


@pytest.fixture
def make_proxy(tmp_path: Path, engine: str) -> Iterator[Callable[..., Proxy]]:
    made: list[Proxy] = []

    def make(config: dict[str, Any] | str, **kw: Any) -> Proxy:
        kw.setdefault("engine", engine)
        proxy = Proxy(tmp_path, config, **kw)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()
    for proxy in made:
        # each worker's engine checks, when it stops, that it let go of everything it held
        assert "still held" not in proxy.output(), proxy.output()


@pytest.fixture(params=["splice", "copy", "auto"])
def relay(request: pytest.FixtureRequest) -> str:
    """Each tunnel behaviour runs under every relay mode of the core."""
    return request.param


def ws_config(port: int, upstream: str, **location: Any) -> dict[str, Any]:
    """One server on 127.0.0.1:port with /ws proxied to `upstream` and a JSON status page."""
    loc = {"path": "/ws", "proxy_pass": "backend"}
    loc.update(location)
    return {
        "upstream": [{"name": "backend", "servers": [upstream]}],
        "server": [{
            "listen": [f"127.0.0.1:{port}"],
            "location": [loc, {"path": "= /status", "status": "json"}],
        }],
    }


@pytest.fixture
def port() -> int:
    return free_port()
