"""The one table of nginx variables (fastws/variables.py) and the engine's evaluation of each,
checked together: every variable is written to an access log and its value compared, so that
a row of the table and the engine's Var enum out of step show here."""

from __future__ import annotations

import json
import socket

import pytest

from engine_support import EngineRunner, tunnel_config
from fastws import variables
from support import RawBackend, free_port, raw_echo_handler, read_all, read_head, upgrade_request, \
    wait_until

NAMES = [name for name in variables.NUMBERS if name not in variables.NAMED]


def test_parse_template_splits_literals_and_variables():
    t = variables.parse_template("a $host b ${http_x_real_ip}c")
    assert t.parts == ((-1, "a "), (variables.NUMBERS["host"], ""), (-1, " b "),
                       (variables.NUMBERS["http_"], "x-real-ip"), (-1, "c"))
    with pytest.raises(ValueError, match=r"unknown variable \$nope"):
        variables.parse_template("$nope")
    with pytest.raises(ValueError, match="only when the log line is written"):
        variables.parse_template("$status")


def test_every_variable_as_the_engine_renders_it(tmp_path):
    backend = RawBackend(raw_echo_handler)
    log = tmp_path / "all.jsonl"
    cfg = tunnel_config(backend.address)
    port = free_port()
    cfg["server"][0]["listen"] = [f"127.0.0.1:{port}"]
    cfg["server"][0]["server_name"] = ["example.com"]
    cfg["log_format"] = {"all": {"json": NAMES + ["http_x_test", "arg_y", "cookie_c"]}}
    cfg["server"][0]["location"][0]["access_log"] = {"path": str(log), "format": "all"}
    r = EngineRunner(cfg)
    head = upgrade_request(path="/p%20a?x=1&y=2", host="Example.COM:8080",
                           extra="X-Test: v\r\nCookie: a=1; c=3\r\n"
                                 "X-Forwarded-For: 10.0.0.9\r\n"
                                 "Authorization: Basic dXNlcjpwYXNz\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b"hi")
        answer, rest = read_head(s)
        assert answer.startswith(b"HTTP/1.1 101 ")
        s.shutdown(socket.SHUT_WR)
        assert rest + read_all(s) == b"hi"
        local_port = s.getsockname()[1]
    r.call(r.engine.flush_logs)
    wait_until(lambda: log.exists() and log.read_text().endswith("\n"))
    line = json.loads(log.read_text().splitlines()[-1])
    expected = {
        "host": "example.com", "remote_addr": "127.0.0.1", "remote_port": str(local_port),
        "scheme": "http", "server_addr": "127.0.0.1", "server_port": str(port),
        "server_name": "example.com", "request_uri": "/p%20a?x=1&y=2", "uri": "/p a",
        "args": "x=1&y=2", "query_string": "x=1&y=2", "request_method": "GET",
        "proxy_add_x_forwarded_for": "10.0.0.9, 127.0.0.1", "proxy_host": "backend",
        "connection_upgrade": "upgrade", "request": "GET /p%20a?x=1&y=2 HTTP/1.1",
        "remote_user": "user", "server_protocol": "HTTP/1.1", "connection_requests": "1",
        "upstream_addr": backend.address, "status": "101", "upstream_status": "101",
        "tunnel": "close", "tunnel_close": "client", "http_x_test": "v", "arg_y": "2",
        "cookie_c": "3", "binary_remote_addr": "\\x7F\\x00\\x00\\x01",
        "proxy_protocol_addr": "",
    }
    for name, value in expected.items():
        assert line[name] == value, name
    assert int(line["connection"]) >= 1 and int(line["pid"]) > 0
    assert int(line["body_bytes_sent"]) == 2 and int(line["bytes_sent"]) > 2
    assert int(line["request_length"]) == len(head) + 2
    assert int(line["upstream_bytes_sent"]) == int(line["request_length"])
    assert int(line["upstream_bytes_received"]) == int(line["bytes_sent"])
    for name in ("request_time", "upstream_connect_time", "upstream_header_time",
                 "upstream_response_time", "msec"):
        assert float(line[name]) >= 0, name
    assert line["time_iso8601"][4] == "-" and line["time_local"][2] == "/"
    assert set(line) == set(NAMES) | {"http_x_test", "arg_y", "cookie_c"}
    r.close()
    backend.close()
