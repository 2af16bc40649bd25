"""Python hooks (fastws/hooks.py, engine/hooks.pxi): the decisions, as real clients and
backends see them, and what a hook's failure does to its client and to everyone else."""

from __future__ import annotations

import itertools
import socket
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
from websockets.sync.client import connect

from fastws import config, hooks
from fastws.errors import ConfigError
from support import (EmbeddedProxy, NamedBackend, free_port, read_all, read_head,
                     upgrade_request, wait_until, ws_frame, ws_read_frame)

_names = itertools.count()


@pytest.fixture
def hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Write a module of hooks (each test's own name: modules are imported once)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"fastws_test_hooks_{next(_names)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


@pytest.fixture
def backends() -> Iterator[list[NamedBackend]]:
    made = [NamedBackend("one"), NamedBackend("two")]
    yield made
    for b in made:
        b.sock.close()


def proxy_config(backends: list[NamedBackend], **location: Any) -> dict[str, Any]:
    loc: dict[str, Any] = {"path": "/", "proxy_pass": "one"}
    loc.update(location)
    return {"upstream": [{"name": "one", "servers": [backends[0].address]},
                         {"name": "two", "servers": [backends[1].address]}],
            "server": [{"listen": [f"127.0.0.1:{free_port()}"], "location": [loc]}]}


@pytest.fixture
def embedded() -> Iterator[Any]:
    made: list[EmbeddedProxy] = []

    def start(cfg: dict[str, Any]) -> EmbeddedProxy:
        p = EmbeddedProxy(cfg)
        made.append(p)
        return p

    yield start
    for p in made:
        assert p.close() == {}


def handshake(port: int, path: str = "/chat", extra: bytes = b"") -> tuple[bytes, bytes,
                                                                            socket.socket]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    req = upgrade_request(path=path, host="example.com")
    s.sendall(req[:-2] + extra + b"\r\n")
    head, rest = read_head(s)
    return head, rest, s


def echo_once(s: socket.socket, rest: bytes) -> bytes:
    s.sendall(ws_frame(b"ping?"))
    frame = ws_read_frame(s, rest)
    assert frame is not None
    return frame[1]


# --- the module's own checks ---------------------------------------------------------------------

def test_headers_keep_their_order_and_look_up_ignoring_case() -> None:
    h = hooks.Headers([("Host", "a"), ("X-Thing", "1"), ("x-thing", "2")])
    assert h.get("x-THING") == "1" and h.getall("X-Thing") == ["1", "2"]
    assert "host" in h and "cookie" not in h and h.get("cookie") is None
    assert list(h) == ["Host", "X-Thing", "x-thing"] and len(h) == 3
    with pytest.raises(KeyError):
        h["cookie"]


def _hook(**groups: int) -> hooks.Hook:
    targets = hooks.Targets(groups or {"one": 0, "two": 1},
                            {"127.0.0.1:8001": [(1, 0)], "[::1]:8002": [(1, 1), (0, 3)]})
    return hooks.Hook(lambda r: None, "m:f", targets)


def test_a_decision_becomes_what_the_engine_applies() -> None:
    h = _hook()
    assert h.decide(None) is None
    d = h.decide(hooks.Decision(upstream="two", set_headers={"Host": "api"},
                                add_headers=[("X-A", "1")], remove_headers=["Cookie"],
                                hash_key="k", log={"User": "bob"}))
    assert d == (0, b"", None, b"", 1, -1, b"host\0cookie\0", b"Host: api\r\nX-A: 1\r\n",
                 b"k", b"user\0bob\0")
    assert h.decide(hooks.Decision(address="[0:0::1]:8002"))[4:6] == (1, 1)
    assert h.decide(hooks.Decision(upstream="one", address="[::1]:8002"))[4:6] == (0, 3)
    deny = h.decide(hooks.Deny(401, "no", headers=[("WWW-Authenticate", "Bearer")]))
    assert deny[:4] == (401, b"WWW-Authenticate: Bearer\r\n", b"no", b"text/plain")


@pytest.mark.parametrize("result, problem", [
    (hooks.Decision(upstream="nope"), "no upstream group 'nope'"),
    (hooks.Decision(address="127.0.0.1:9"), "is not a server of any upstream group"),
    (hooks.Decision(address="backend:80"), "is not \"IP:port\""),
    (hooks.Decision(upstream="one", address="127.0.0.1:8001"), "not a server of that upstream"),
    (hooks.Decision(set_headers={"Connection": "x"}), "belongs to the proxy"),
    (hooks.Decision(remove_headers=["Content-Length"]), "belongs to the proxy"),
    (hooks.Decision(set_headers={"X-A": "1\r\nX-B: 2"}), "not a one-line string"),
    (hooks.Decision(add_headers=[("Bad Name", "1")]), "is not a token"),
    (hooks.Decision(add_headers=[("Host", "x")]), "second Host"),
    (hooks.Decision(log={"a-b": "1"}), "not a variable name"),
    (hooks.Decision(log={"user": "eve\r\nX-Admin: 1"}), "has a control character"),
    (hooks.Decision(remove_headers=["Host"]), "cannot remove Host"),
    (hooks.Deny(403, body=123), "not text or bytes"),               # type: ignore[arg-type]
    (hooks.Deny(403, content_type=None), "not a one-line string"),  # type: ignore[arg-type]
    (hooks.Decision(add_headers={"X-A": "1"}), "cannot be applied"),  # type: ignore[arg-type]
    (hooks.Deny(99), "is not 200-599"),
    (hooks.Deny(403, headers={"Content-Length": "1"}), "the proxy writes it"),
    ("yes", "returned str"),
])
def test_a_decision_the_engine_cannot_apply_is_a_500(result: Any, problem: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert _hook().decide(result)[0] == 500
    assert problem in caplog.text and "hook m:f" in caplog.text


def test_load_names_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fastws_test_load.py").write_text("x = 1\ndef f(r): pass\n")
    assert hooks.load("fastws_test_load:f").__name__ == "f"
    for path, problem in (("nocolon", "is not an import path"),
                          ("fastws_test_nosuch:f", "cannot import 'fastws_test_nosuch'"),
                          ("fastws_test_load:g", "has no 'g'"),
                          ("fastws_test_load:x", "is not callable")):
        with pytest.raises(ValueError, match=problem):
            hooks.load(path)


# --- configuration ---------------------------------------------------------------------------------

def test_locations_inherit_the_servers_hooks(hook_module: Any) -> None:
    mod = hook_module("def h(r): pass\ndef c(t): pass\n")
    cfg = config.from_dict({
        "upstream": [{"name": "b", "servers": ["127.0.0.1:9"]}],
        "server": [{"listen": ["127.0.0.1:8080"], "hook": f"{mod}:h", "hook_timeout": "2s",
                    "on_tunnel_close": f"{mod}:c",
                    "location": [{"path": "/", "proxy_pass": "b"},
                                 {"path": "/off", "proxy_pass": "b", "hook": ""},
                                 {"path": "/ping", "return": 200}]}]})
    inherit, off, ret = cfg.servers[0].locations
    assert inherit.hooks.hook == f"{mod}:h" and inherit.hooks.timeout == 2.0
    assert inherit.hooks.hook_fn.__name__ == "h" and inherit.hooks.close_fn.__name__ == "c"
    assert off.hooks.hook is None and off.hooks.on_tunnel_close == f"{mod}:c"
    assert ret.hooks.hook == f"{mod}:h"     # inherited, and never called (no upstream)


@pytest.mark.parametrize("location, problem", [
    ({"hook": "fastws_test_missing_module:f"},
     "location['/'].hook: cannot import 'fastws_test_missing_module'"),
    ({"hook": "nocolon"}, "is not an import path"),
    ({"on_tunnel_close": "os:nosuch"}, "module 'os' has no 'nosuch'"),
    ({"hook_timeout": "0s"}, "hook_timeout: must be greater than zero"),
    ({"hook": "os:getcwd", "return": 200, "proxy_pass": None}, "a location with return"),
])
def test_a_hook_configuration_mistake_is_one_line(location: dict[str, Any],
                                                  problem: str) -> None:
    loc = {"path": "/", "proxy_pass": "b", **location}
    if loc["proxy_pass"] is None:
        del loc["proxy_pass"]
    with pytest.raises(ConfigError) as err:
        config.from_dict({"upstream": [{"name": "b", "servers": ["127.0.0.1:9"]}],
                          "server": [{"listen": ["127.0.0.1:8080"], "location": [loc]}]},
                         "fastws.toml")
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("fastws.toml: ")


def test_fastws_t_fails_on_a_hook_that_cannot_be_imported(tmp_path: Path) -> None:
    import subprocess
    import sys
    path = tmp_path / "fastws.toml"
    path.write_text('[[upstream]]\nname = "b"\nservers = ["127.0.0.1:9"]\n'
                    '[[server]]\nlisten = ["127.0.0.1:8080"]\n'
                    'hook = "fastws_test_nowhere:check"\n'
                    '[[server.location]]\npath = "/"\nproxy_pass = "b"\n')
    out = subprocess.run([sys.executable, "-m", "fastws", "-t", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "server[0].hook: cannot import 'fastws_test_nowhere'" in lines[0]


def test_nginx_directives_set_the_hooks(tmp_path: Path, hook_module: Any) -> None:
    mod = hook_module("def h(r): pass\ndef c(t): pass\n")
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
        events {{}}
        http {{
            upstream b {{ server 127.0.0.1:9; }}
            server {{
                listen 127.0.0.1:8080;
                fastws_hook {mod}:h;
                fastws_hook_timeout 3s;
                fastws_on_tunnel_close {mod}:c;
                location / {{ proxy_pass http://b; fastws_hook_requests on; }}
                location /free {{ proxy_pass http://b; fastws_hook off; }}
            }}
        }}""")
    cfg = config.load(str(conf))
    main, free = cfg.servers[0].locations
    assert (main.hooks.hook, main.hooks.requests, main.hooks.timeout) == (f"{mod}:h", True, 3.0)
    assert main.hooks.on_tunnel_close == f"{mod}:c"
    assert free.hooks.hook is None and free.hooks.on_tunnel_close == f"{mod}:c"


# --- what clients and backends see ------------------------------------------------------------

def test_a_hook_denies_with_its_status_headers_and_body(hook_module: Any, embedded: Any,
                                                        backends: list[NamedBackend],
                                                        tmp_path: Path) -> None:
    mod = hook_module("""
        from fastws.hooks import Deny
        def check(r):
            if r.args.get("token") != "good":
                return Deny(401, "no token\\n", headers={"WWW-Authenticate": "Bearer"},
                            log={"why": "token"})
    """)
    log = tmp_path / "access.log"
    cfg = proxy_config(backends, hook=f"{mod}:check",
                       access_log={"path": str(log), "format": "hooked"})
    cfg["log_format"] = {"hooked": "$status $hook_why $request_uri"}
    p = embedded(cfg)
    head, rest, s = handshake(p.port, "/chat?token=bad")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"\r\nWWW-Authenticate: Bearer\r\n" in head and rest == b"no token\n"
    s.close()
    head, rest, s = handshake(p.port, "/chat?token=good")
    assert head.startswith(b"HTTP/1.1 101 ") and echo_once(s, rest) == b"ping?"
    s.close()
    assert [h[0] for h in backends[0].heads] == ["GET /chat?token=good HTTP/1.1"]
    p.call(p.engine.flush_logs)
    wait_until(lambda: "401 token /chat?token=bad" in log.read_text())


def test_a_hook_changes_the_headers_going_upstream(hook_module: Any, embedded: Any,
                                                  backends: list[NamedBackend]) -> None:
    mod = hook_module("""
        from fastws.hooks import Decision
        def check(r):
            return Decision(set_headers={"Host": "internal", "X-User": r.headers["x-token"]},
                            add_headers=[("X-Tag", "a"), ("X-Tag", "b")],
                            remove_headers=["X-Token", "X-Forwarded-For"])
    """)
    p = embedded(proxy_config(backends, hook=f"{mod}:check"))
    head, rest, s = handshake(p.port, extra=b"X-Token: alice\r\nX-Kept: 1\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    s.close()
    _, fields = backends[0].heads[0]
    names = [k.lower() for k, _ in fields]
    assert ("Host", "internal") in fields and names.count("host") == 1
    assert ("X-User", "alice") in fields and ("X-Kept", "1") in fields
    assert [v for k, v in fields if k == "X-Tag"] == ["a", "b"]
    assert "x-token" not in names and "x-forwarded-for" not in names
    assert "x-real-ip" in names      # the proxy's own, not removed


def test_a_hook_routes_to_a_group_or_a_server(hook_module: Any, embedded: Any,
                                             backends: list[NamedBackend]) -> None:
    mod = hook_module(f"""
        from fastws.hooks import Decision
        def check(r):
            if r.path == "/group":
                return Decision(upstream="two")
            if r.path == "/server":
                return Decision(address="{backends[1].address}")
    """)
    p = embedded(proxy_config(backends, hook=f"{mod}:check", hook_requests=True))
    for path in ("/group", "/server", "/default"):
        head, _, s = handshake(p.port, path)
        assert head.startswith(b"HTTP/1.1 101 ")
        s.close()
    assert [h[0].split()[1] for h in backends[1].heads] == ["/group", "/server"]
    assert [h[0].split()[1] for h in backends[0].heads] == ["/default"]


def test_a_hook_sets_the_hash_key(hook_module: Any, embedded: Any,
                                 backends: list[NamedBackend]) -> None:
    # every request of one tenant to one server, whatever the template would have said
    mod = hook_module("""
        from fastws.hooks import Decision
        def check(r):
            return Decision(hash_key=r.args["tenant"])
    """)
    cfg = proxy_config(backends, hook=f"{mod}:check", proxy_pass="both")
    cfg["upstream"].append({"name": "both", "balance": "hash", "hash_key": "$request_uri",
                            "consistent": True,
                            "servers": [backends[0].address, backends[1].address]})
    p = embedded(cfg)
    for i in range(12):
        head, _, s = handshake(p.port, f"/x{i}?tenant={'a' if i % 2 else 'b'}")
        assert head.startswith(b"HTTP/1.1 101 ")
        s.close()
    by_tenant: dict[str, set[str]] = {}
    for b in backends:
        for line, _ in b.heads:
            by_tenant.setdefault(line.split("tenant=")[1][0], set()).add(b.name)
    assert all(len(names) == 1 for names in by_tenant.values()), by_tenant


def test_plain_requests_go_through_the_hook_only_when_asked(
        hook_module: Any, embedded: Any, backends: list[NamedBackend]) -> None:
    mod = hook_module("""
        calls = []
        def check(r):
            calls.append((r.method, r.websocket))
    """)
    import importlib
    cfg = proxy_config(backends, hook=f"{mod}:check")
    cfg["server"][0]["location"].append({"path": "/all", "proxy_pass": "one",
                                         "hook": f"{mod}:check", "hook_requests": True})
    p = embedded(cfg)
    for path in ("/plain", "/all"):
        s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert read_all(s).startswith(b"HTTP/1.1 200 ")
        s.close()
    head, _, s = handshake(p.port)
    s.close()
    assert importlib.import_module(mod).calls == [("GET", False), ("GET", True)]


def test_the_hook_sees_the_request(hook_module: Any, embedded: Any,
                                   backends: list[NamedBackend]) -> None:
    mod = hook_module("""
        seen = []
        def check(r):
            seen.append(dict(method=r.method, target=r.target, path=r.path, query=r.query,
                             args=dict(r.args), host=r.host, x=r.headers.getall("x-multi"),
                             client=(r.client_addr, r.client_port), ws=r.websocket,
                             location=r.location, tls=r.tls, sni=r.tls_sni,
                             uri=r.variable("request_uri"), cookie=r.variable("cookie_sid")))
    """)
    cfg = proxy_config(backends, hook=f"{mod}:check")
    cfg["server"][0]["location"][0]["path"] = "/app"
    p = embedded(cfg)
    head, _, s = handshake(p.port, "/app/chat?a=1&b=&a=2",
                           b"X-Multi: 1\r\nX-multi: 2\r\nCookie: sid=abc\r\n")
    port = s.getsockname()[1]
    s.close()
    import importlib
    assert importlib.import_module(mod).seen == [dict(
        method="GET", target="/app/chat?a=1&b=&a=2", path="/app/chat", query="a=1&b=&a=2",
        args={"a": "1", "b": ""}, host="example.com", x=["1", "2"], client=("127.0.0.1", port),
        ws=True, location="/app", tls=False, sni=None, uri="/app/chat?a=1&b=&a=2",
        cookie="abc")]


def test_a_failing_hook_gives_500_and_one_log_line(hook_module: Any, embedded: Any,
                                                   backends: list[NamedBackend]) -> None:
    mod = hook_module("""
        def check(r):
            if r.path == "/boom":
                raise ValueError("no such tenant")
    """)
    p = embedded(proxy_config(backends, hook=f"{mod}:check"))
    head, _, s = handshake(p.port, "/boom")
    assert head.startswith(b"HTTP/1.1 500 ")
    s.close()
    errors = [m for m in p.messages if m.startswith("ERROR")]
    assert len(errors) == 1, p.messages
    assert f"hook {mod}:check failed: ValueError: no such tenant (" in errors[0]
    assert f"{mod}.py:4 in check)" in errors[0]
    head, rest, s = handshake(p.port, "/fine")      # the worker goes on serving
    assert head.startswith(b"HTTP/1.1 101 ") and echo_once(s, rest) == b"ping?"
    s.close()


def test_a_coroutine_hook_decides_while_others_are_served(hook_module: Any, embedded: Any,
                                                          backends: list[NamedBackend]) -> None:
    mod = hook_module("""
        import asyncio
        from fastws.hooks import Decision, Deny
        gate = None
        async def check(r):
            global gate
            if r.path == "/wait":
                gate = asyncio.get_running_loop().create_future()
                await gate
                return Decision(add_headers=[("X-Async", "1")])
            if r.path == "/deny":
                await asyncio.sleep(0)
                return Deny(403)
    """)
    import importlib
    m = importlib.import_module(mod)
    p = embedded(proxy_config(backends, hook=f"{mod}:check"))
    waiting = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    waiting.sendall(upgrade_request(path="/wait", host="example.com"))
    wait_until(lambda: m.gate is not None)
    # while it waits, other handshakes are decided and relayed
    head, rest, s = handshake(p.port, "/other")
    assert head.startswith(b"HTTP/1.1 101 ") and echo_once(s, rest) == b"ping?"
    s.close()
    head, _, s = handshake(p.port, "/deny")
    assert head.startswith(b"HTTP/1.1 403 ")
    s.close()
    assert p.engine.stats()["states"]["hook"] == 1
    p.call(lambda: m.gate.set_result(None))
    head, rest = read_head(waiting)
    assert head.startswith(b"HTTP/1.1 101 ") and echo_once(waiting, rest) == b"ping?"
    waiting.close()
    assert ("X-Async", "1") in [f for line, fields in backends[0].heads
                                if line.startswith("GET /wait") for f in fields]


SLEEPER = """
    import asyncio
    cancelled = []
    async def check(r):
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            cancelled.append(r.path)
            raise
"""


def test_a_coroutine_hook_out_of_time_gives_504_and_is_cancelled(
        hook_module: Any, embedded: Any, backends: list[NamedBackend]) -> None:
    import importlib
    mod = hook_module(SLEEPER)
    m = importlib.import_module(mod)
    p = embedded(proxy_config(backends, hook=f"{mod}:check", hook_timeout="0.2s"))
    head, _, s = handshake(p.port, "/slow")
    assert head.startswith(b"HTTP/1.1 504 ")
    s.close()
    wait_until(lambda: m.cancelled == ["/slow"])
    assert any("gave no decision within 0.2s" in m for m in p.messages)
    assert backends[0].heads == []


def test_a_client_that_leaves_cancels_its_hook(hook_module: Any, embedded: Any,
                                               backends: list[NamedBackend]) -> None:
    # the coroutine is cancelled when the client goes, not at hook_timeout (nginx's check for
    # a broken connection while the upstream is awaited)
    import importlib
    mod = hook_module(SLEEPER)
    m = importlib.import_module(mod)
    p = embedded(proxy_config(backends, hook=f"{mod}:check", hook_timeout="600s"))
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(upgrade_request(path="/gone", host="example.com"))
    wait_until(lambda: p.engine.stats()["states"]["hook"] == 1)
    s.close()
    wait_until(lambda: m.cancelled == ["/gone"])
    assert p.engine.stats()["states"]["hook"] == 0 and backends[0].heads == []


def test_on_tunnel_close_gets_each_tunnels_figures(hook_module: Any, embedded: Any,
                                                   backends: list[NamedBackend]) -> None:
    mod = hook_module("""
        import threading
        from fastws.hooks import Decision
        records = []
        threads = set()
        def check(r):
            return Decision(log={"customer": r.args.get("c", "")})
        def closed(t):
            threads.add(threading.current_thread().name)
            records.append(t)
    """)
    import importlib
    m = importlib.import_module(mod)
    p = embedded(proxy_config(backends, hook=f"{mod}:check", on_tunnel_close=f"{mod}:closed"))
    with connect(f"ws://127.0.0.1:{p.port}/chat?c=acme") as ws:
        for i in range(3):
            ws.send(b"x" * 100)
            assert ws.recv() == b"x" * 100
    wait_until(lambda: len(m.records) == 1)
    t = m.records[0]
    assert (t.messages_from_client, t.messages_to_client) == (3, 3)
    assert t.bytes_from_client >= 3 * 106 and t.bytes_to_client >= 3 * 102
    # the client began the closing handshake; the server then ends the TCP stream first
    assert (t.close_code, t.closed_by, t.reason) == (1000, "client", "upstream")
    assert t.upstream == backends[0].address and t.location == "/"
    assert t.hook == {"customer": "acme"} and t.duration > 0
    assert m.threads == {"fastws-on-tunnel-close"}    # never on the engine's thread


def test_a_location_without_hooks_calls_no_python(hook_module: Any, embedded: Any,
                                                  backends: list[NamedBackend]) -> None:
    mod = hook_module("""
        calls = []
        def check(r):
            calls.append(r.path)
        def closed(t):
            calls.append("closed")
    """)
    import importlib
    cfg = proxy_config(backends)
    cfg["server"][0]["location"].append({"path": "/hooked", "proxy_pass": "one",
                                         "hook": f"{mod}:check",
                                         "on_tunnel_close": f"{mod}:closed"})
    p = embedded(cfg)
    head, rest, s = handshake(p.port, "/plain")
    assert echo_once(s, rest) == b"ping?"
    s.close()
    head, rest, s = handshake(p.port, "/hooked")
    s.close()
    m = importlib.import_module(mod)
    wait_until(lambda: m.calls == ["/hooked", "closed"])


def test_coroutine_hooks_in_worker_processes(hook_module: Any, backends: list[NamedBackend],
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            make_proxy: Any) -> None:
    # the fastws command's workers wait in the engine, not in the event loop: a coroutine
    # hook's timers and I/O still run there
    mod = hook_module("""
        import asyncio
        from fastws.hooks import Decision
        async def check(r):
            reader, writer = await asyncio.open_connection("127.0.0.1", int(r.args["port"]))
            writer.write(b"who?")
            name = (await reader.read(100)).decode()
            writer.close()
            await asyncio.sleep(0.01)
            return Decision(upstream=name)
    """)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    directory = socket.socket()          # what the hook asks: which group
    directory.bind(("127.0.0.1", 0))
    directory.listen()

    def answer() -> None:
        while True:
            try:
                conn, _ = directory.accept()
            except OSError:
                return
            conn.recv(100)
            conn.sendall(b"two")
            conn.close()

    import threading
    threading.Thread(target=answer, daemon=True).start()
    cfg = proxy_config(backends, hook=f"{mod}:check")
    cfg["processes"] = 2
    port = int(cfg["server"][0]["listen"][0].rsplit(":", 1)[1])
    p = make_proxy(cfg, port=port)
    for i in range(6):
        head, rest, s = handshake(port, f"/c{i}?port={directory.getsockname()[1]}")
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert echo_once(s, rest) == b"ping?"
        s.close()
    directory.close()
    assert len(backends[1].heads) == 6 and backends[0].heads == []
    assert "Traceback" not in p.output()


def test_a_reload_runs_the_hooks_new_code(hook_module: Any, backends: list[NamedBackend],
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          make_proxy: Any) -> None:
    import signal
    mod = hook_module("""
        from fastws.hooks import Deny
        def check(r):
            return Deny(403)
    """)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    cfg = proxy_config(backends, hook=f"{mod}:check")
    port = int(cfg["server"][0]["listen"][0].rsplit(":", 1)[1])
    p = make_proxy(cfg, port=port)
    head, _, s = handshake(port)
    assert head.startswith(b"HTTP/1.1 403 ")
    s.close()
    first = set(p.workers())
    (tmp_path / f"{mod}.py").write_text("def check(r):\n    return None  # the new code\n")
    p.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: set(p.workers()) and not set(p.workers()) & first)
    head, rest, s = handshake(port)
    assert head.startswith(b"HTTP/1.1 101 ") and echo_once(s, rest) == b"ping?"
    s.close()


def test_a_handed_over_tunnel_keeps_its_close_callback(hook_module: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       make_proxy: Any) -> None:
    # a reload hands the tunnel to a new worker: its callback (named the same in the new
    # configuration) is called there once, with the whole tunnel's figures and $hook_ values
    import json
    import signal
    from support import EchoBackend
    records = tmp_path / "records.jsonl"
    mod = hook_module(f"""
        import dataclasses, json, os
        from fastws.hooks import Decision
        def check(r):
            return Decision(log={{"customer": "acme"}})
        def closed(t):
            with open({str(records)!r}, "a") as f:
                f.write(json.dumps(dict(dataclasses.asdict(t), pid=os.getpid())) + "\\n")
    """)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    backend = EchoBackend()
    try:
        port = free_port()
        cfg = {"upstream": [{"name": "app", "servers": [backend.address]}],
               "server": [{"listen": [f"127.0.0.1:{port}"], "server_name": ["chat"],
                           "location": [{"path": "/ws", "proxy_pass": "app",
                                         "hook": f"{mod}:check",
                                         "on_tunnel_close": f"{mod}:closed"}]}]}
        p = make_proxy(cfg, port=port)
        with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            ws.send(b"a" * 1000)
            assert ws.recv() == b"a" * 1000
            old = set(p.workers())
            p.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: set(p.workers()) and not set(p.workers()) & old)
            ws.send(b"b" * 1000)
            assert ws.recv() == b"b" * 1000
        wait_until(lambda: records.exists() and records.read_text().count("\n") == 1)
        (t,) = [json.loads(line) for line in records.read_text().splitlines()]
        assert t["pid"] not in old and t["hook"] == {"customer": "acme"}
        assert (t["messages_from_client"], t["messages_to_client"]) == (2, 2)
        assert t["bytes_from_client"] > 2000 and (t["server_name"], t["location"]) == ("chat",
                                                                                        "/ws")
        assert (t["close_code"], t["closed_by"]) == (1000, "client")
    finally:
        backend.close()


def test_a_hook_fails_closed(hook_module: Any, embedded: Any,
                             backends: list[NamedBackend]) -> None:
    # whatever its decision's fault, a refusal is never turned into a pass
    mod = hook_module("""
        from fastws.hooks import Decision, Deny
        def check(r):
            return {"/wrongtype": Deny(403, body=123),
                    "/inject": Decision(set_headers={"X-User": "$hook_user"}.copy(),
                                        log={"user": "eve\\r\\nX-Admin: 1"}),
                    "/exit": None}[r.path] if r.path != "/exit" else _exit()
        def _exit():
            raise SystemExit(3)
    """)
    cfg = proxy_config(backends, hook=f"{mod}:check")
    p = embedded(cfg)
    for path in ("/wrongtype", "/inject", "/exit"):
        head, _, s = handshake(p.port, path)
        assert head.startswith(b"HTTP/1.1 500 "), (path, head)
        s.close()
    assert backends[0].heads == []


def test_the_hook_wins_over_set_headers_and_shapes_its_answers(
        hook_module: Any, embedded: Any, backends: list[NamedBackend]) -> None:
    mod = hook_module("""
        from fastws.hooks import Decision, Deny
        def check(r):
            if r.path == "/busy":
                return Deny(503, headers={"Retry-After": "30"})
            if r.path == "/refused":
                return Deny(403, "not you\\n")
            return Decision(set_headers={"Host": "from-hook", "X-Tag": "hook"})
    """)
    p = embedded(proxy_config(backends, hook=f"{mod}:check",
                              set_headers={"Host": "from-config", "X-Tag": "config"}))
    head, _, s = handshake(p.port, "/go")
    assert head.startswith(b"HTTP/1.1 101 ")
    s.close()
    (_, fields), = backends[0].heads
    assert [v for k, v in fields if k.lower() == "host"] == ["from-hook"]
    assert [v for k, v in fields if k.lower() == "x-tag"] == ["hook"]
    head, body, s = handshake(p.port, "/busy")
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 30\r\n" in head
    s.close()
    # a refused handshake with a body: the answer, then the connection closes (what followed
    # the head may be the client's first frames, never a next request)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(upgrade_request(path="/refused", host="example.com") + ws_frame(b"early"))
    answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"\r\nConnection: close\r\n" in answer
    assert answer.endswith(b"not you\n")
    s.close()


def test_a_kept_view_outlives_its_connection_safely(hook_module: Any,
                                                    backends: list[NamedBackend]) -> None:
    import importlib
    mod = hook_module("""
        kept = []
        def check(r):
            kept.append(r)
    """)
    p = EmbeddedProxy(proxy_config(backends, hook=f"{mod}:check"))
    head, _, s = handshake(p.port, "/chat?x=1")
    s.close()
    view = importlib.import_module(mod).kept[0]
    assert view.variable("arg_x") == "1" and view.headers.get("host") == "example.com"
    assert p.close() == {}
    assert view.path == "/chat"                    # its own copy
    with pytest.raises(RuntimeError, match="has stopped"):
        view.variable("arg_x")


def test_a_tunnel_that_begins_during_a_stop_is_closed_politely(
        hook_module: Any, embedded: Any, backends: list[NamedBackend]) -> None:
    # a handshake whose hook decides after the stop's closing handshakes began still gets its
    # own (it would otherwise outlive the stop)
    import importlib
    mod = hook_module("""
        import asyncio
        gate = None
        async def check(r):
            global gate
            gate = asyncio.get_running_loop().create_future()
            await gate
    """)
    m = importlib.import_module(mod)
    p = embedded(proxy_config(backends, hook=f"{mod}:check"))
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(upgrade_request(path="/late", host="example.com"))
    wait_until(lambda: m.gate is not None)
    assert p.call(lambda: p.engine.goodbye(1001, 0.0, "shutdown")) == 0
    p.call(lambda: m.gate.set_result(None))
    head, rest = read_head(s)
    assert head.startswith(b"HTTP/1.1 101 ")
    frame = ws_read_frame(s, rest)
    assert frame is not None and frame[0] == 8 and frame[1][:2] == (1001).to_bytes(2, "big")
    s.close()
