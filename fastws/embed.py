"""fastws inside a Python program.

- `serve(config)`: the master and its workers, as the `fastws` command runs them, until a
  signal stops them (call it from the main thread: the master handles the signals).
- `Proxy(config)`: one engine in the calling asyncio program's own process and event loop, for
  tests and small deployments: `await proxy.start()`, `await proxy.close()`, or
  `async with Proxy(config) as proxy:`.  Its `resolve` names are followed by a thread of its
  own, each change put in place in the engine (Worker.renew_upstream), as the master does for
  its workers.

`config` is a path (TOML or nginx's format) or the TOML file's structure as a dict; either is
checked as `fastws -t` checks it, and a mistake raises ConfigError naming the key.
"""

from __future__ import annotations

import asyncio
import os
from types import TracebackType
from typing import TYPE_CHECKING, Any, Mapping, Union

from . import config as config_mod
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config
    from .worker import Worker

ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]

__all__ = ["ConfigError", "Proxy", "load", "serve"]


def load(config: ConfigSource) -> "Config":
    """A checked configuration from a path or a dict (ConfigError on a mistake)."""
    if isinstance(config, Mapping):
        cfg = config_mod.from_dict(config, "<dict>")
    else:
        cfg = config_mod.load(os.fspath(config))
    from .worker import check_runtime
    check_runtime(cfg)
    return cfg


def serve(config: ConfigSource, *, log_level: str = "info") -> int:
    """Run fastws with its workers until SIGTERM/SIGINT (fast) or SIGQUIT (graceful); SIGHUP
    reloads (a path is read again, a dict checked again).  Returns the exit status."""
    from .accesslog import setup_error_log
    from .master import Master
    cfg = load(config)
    setup_error_log(cfg.error_log, log_level)
    if isinstance(config, Mapping):
        return Master("<dict>", cfg, log_level, data=config).run()
    return Master(os.fspath(config), cfg, log_level).run()


class Proxy:
    """One fastws engine in this process, driven by the running asyncio event loop.  Signals
    are the program's own: nothing is installed for them."""

    def __init__(self, config: ConfigSource) -> None:
        self.config = load(config)
        self._worker: Worker | None = None
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None       # the `resolve` names' dns.Watcher

    async def start(self) -> None:
        """Bind the listeners and serve; returns once connections are accepted."""
        from .worker import Worker
        if self._task is not None:
            raise RuntimeError("the proxy is started already")
        loop = asyncio.get_running_loop()
        worker = Worker(self.config)
        started: asyncio.Future[None] = loop.create_future()
        worker.ready = lambda _: None if started.done() else started.set_result(None)
        self._task = loop.create_task(worker.serve(signals=False))
        await asyncio.wait({started, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()         # its exception (cannot listen, ...)
            raise RuntimeError("the proxy stopped as it started")
        self._worker = worker
        from .dns import Watcher
        self._watcher = Watcher.of(self.config,
                                   lambda: loop.call_soon_threadsafe(self._names_changed))
        self._watcher.start()

    def _names_changed(self) -> None:
        # a `resolve` name's new addresses (the watcher's thread): in place in the engine
        if self._worker is None or self._watcher is None:
            return
        while not self._watcher.changes.empty():
            upstream, host, addresses = self._watcher.changes.get_nowait()
            self._worker.renew_upstream(upstream, {host: addresses})

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) each listener is bound to."""
        if self._worker is None:
            return []
        return [s.getsockname()[:2] for s in self._worker.listeners]

    @property
    def worker(self) -> "Worker":
        if self._worker is None:
            raise RuntimeError("the proxy is not started")
        return self._worker

    def stats(self) -> dict[str, Any]:
        """The engine's counters, as the JSON status page's `engine` part."""
        return dict(self.worker.engine.stats())

    async def close(self, graceful: bool = False) -> None:
        """Stop: at once (every connection closed), or gracefully (no new connection; those
        open end by themselves, WebSocket tunnels closed politely, within shutdown_timeout)."""
        if self._task is None:
            return
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._worker is not None:
            self._worker.stop(graceful)
        try:
            await self._task
        finally:
            self._task = None
            self._worker = None

    async def __aenter__(self) -> "Proxy":
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
