"""fastws/nginx: nginx's syntax read with file and line, the directives turned into the same
checked configuration a TOML file gives, and every mistake as one line naming FILE:LINE."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from fastws import config
from fastws.errors import ConfigError
from fastws.nginx import load, looks_like_nginx, read_translation
from fastws.nginx.directives import IGNORE, REFUSE, SPECS
from fastws.nginx.syntax import read
from nginx_support import Site, reference_blocks, render

MAIN = "events { worker_connections 512; }\n"


def write(tmp: Path, text: str, name: str = "nginx.conf") -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def http(body: str) -> str:
    return MAIN + "http {\n" + body + "\n}\n"


SITE = """
    upstream backend { server 127.0.0.1:9001; server 127.0.0.1:9002 weight=2; }
    server {
        listen 127.0.0.1:8080;
        server_name example.com;
        location /ws { proxy_pass http://backend; }
    }
"""


def error_of(tmp: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(str(write(tmp, text)))
    return str(info.value)


# --- syntax ------------------------------------------------------------------------------------

def test_words_quotes_escapes_comments_and_variables(tmp_path: Path) -> None:
    path = write(tmp_path, 'a "two words" \'it\\\'s\' x\\"y ${host}z; # comment ;{\n'
                 'b { c "semi;colon" "{brace}"; }\n')
    (a, b) = read(str(path)).body
    assert (a.name, a.args, a.line) == ("a", ["two words", "it's", 'x"y', "${host}z"], 1)
    assert a.quoted == [False, True, True, False, False]
    assert b.line == 2 and b.block is not None
    (c,) = b.block
    assert c.args == ["semi;colon", "{brace}"] and c.line == 2


@pytest.mark.parametrize("text, where, problem", [
    ("a b", 1, 'unexpected end of file, expecting ";" or "}"'),
    ("a {\n b;\n", 2, 'unexpected end of file, expecting "}"'),
    ("a;\n}\n", 2, 'unexpected "}"'),
    ("a {\n b c\n}\n", 3, 'unexpected "}": "b" is not terminated by ";"'),
    ('a "open;\n\n', 1, "unexpected end of file in a quoted string"),
    ('a "x"y;', 1, 'unexpected "y" after a quoted string'),
    ("\n;", 2, 'unexpected ";"'),
])
def test_syntax_errors_name_the_file_and_line(tmp_path: Path, text: str, where: int,
                                              problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read(str(path))
    assert str(info.value).startswith(f"{path}:{where}: ")
    assert problem in str(info.value)


def test_include_with_globs_relative_to_the_main_file(tmp_path: Path) -> None:
    write(tmp_path, "upstream b { server 127.0.0.1:9002; }\n", "conf.d/20-b.conf")
    write(tmp_path, "upstream a { server 127.0.0.1:9001; }\n", "conf.d/10-a.conf")
    write(tmp_path, "server { listen 127.0.0.1:8080; location / { proxy_pass http://a; } }\n",
          "sites/site")
    main = write(tmp_path, http("include conf.d/*.conf;\ninclude sites/site;\n"
                                "include none/*.conf;"))
    t = read_translation(str(main))
    assert [u["name"] for u in t.data["upstream"]] == ["a", "b"]     # sorted, as nginx
    assert t.files == [str(main), str(tmp_path / "conf.d/10-a.conf"),
                       str(tmp_path / "conf.d/20-b.conf"), str(tmp_path / "sites/site")]


def test_a_missing_or_recursive_include_is_one_line(tmp_path: Path) -> None:
    main = write(tmp_path, http("include missing.conf;"))
    assert error_of(tmp_path, main.read_text()) == \
        f"{main}:3: cannot open {tmp_path}/missing.conf: no such file or directory"
    write(tmp_path, "include loop.conf;\n", "loop.conf")
    text = http("include loop.conf;")
    assert "includes itself" in error_of(tmp_path, text)


def test_the_format_is_told_by_name_or_content(tmp_path: Path) -> None:
    assert looks_like_nginx("# c\nworker_processes 1;\n")
    assert looks_like_nginx("http {\n")
    assert looks_like_nginx("location = /x {")
    assert not looks_like_nginx("# c\nprocesses = 1\n")
    assert not looks_like_nginx("[[server]]\n")
    assert not looks_like_nginx('"quoted.key" = 1\n')
    site = http(SITE)
    for name in ("nginx.conf", "site.conf", "proxy"):
        cfg = config.load(str(write(tmp_path, site, name)))
        assert cfg.format == "nginx"
    toml = write(tmp_path, "[[server]]\nlisten = [\"127.0.0.1:8080\"]\n"
                 "[[server.location]]\npath = \"/\"\nreturn = 204\n", "fastws.conf")
    assert config.load(str(toml), "toml").format == "toml"
    with pytest.raises(ConfigError, match="fastws.conf:"):
        config.load(str(toml))      # a .conf file is read as nginx's unless told


# --- the same configuration as TOML ----------------------------------------------------------

def test_every_reference_block_translates_and_checks(tmp_path: Path) -> None:
    cert = tmp_path / "c.crt"
    key = tmp_path / "c.key"
    import trustme
    issued = trustme.CA().issue_cert("example.com")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    site = Site(tmp_path, 8080, 8443, ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"],
                "127.0.0.1:9009", str(cert), str(key))
    checked = {}
    for title in reference_blocks():
        if title.startswith("Troubleshooting"):
            continue
        cfg = load(str(write(tmp_path, render(title, site), f"{title.split()[0]}.conf")))
        checked[title] = cfg
    basic = checked["Basic configuration"].servers[0].locations[0]
    assert (basic.connect_timeout, basic.send_timeout, basic.read_timeout) == (604800,) * 3
    assert [(n, v and v.text) for n, v in basic.set_headers] == [
        ("Host", "$host"), ("X-Real-IP", "$remote_addr"),
        ("X-Forwarded-For", "$proxy_add_x_forwarded_for"),
        ("X-Forwarded-Proto", "$http_x_forwarded_proto")]
    complete = checked["Complete configuration example"]
    assert [loc.path for loc in complete.servers[0].locations] == ["/ws", "/"]
    assert complete.upstream("websocket_backend").servers[1].address == "127.0.0.1:9002"
    tls = checked["HTTPS WebSocket configuration"].servers[0].tls
    assert tls is not None and tls.certificate == str(cert)
    assert checked["WebSocket load balancing"].upstream("websocket_backend").balance == "ip_hash"
    perf = checked["Performance optimisation"]
    assert perf.worker_connections == 4096 and perf.upstream("websocket_backend").keepalive == 32
    assert perf.servers[0].locations[0].socket_keepalive
    multi = checked["Multi-path WebSocket"].servers[0].locations
    assert [(loc.path, loc.proxy_pass) for loc in multi][:2] == [
        ("/chat/ws", "chat_backend"), ("/notification/ws", "notification_backend")]
    mon = checked["Monitoring and logging"].servers[0].locations
    assert mon[0].status == "stub" and mon[0].access_log is None
    assert mon[1].access_log.format.name == "websocket"
    assert mon[1].access_log.path == str(tmp_path / "websocket_access.log")


def test_convert_round_trips_to_the_same_configuration(tmp_path: Path) -> None:
    from fastws.convert import to_toml
    path = write(tmp_path, MAIN + "worker_processes 2;\nhttp {\n"
                 "log_format short '$remote_addr $status';\naccess_log logs/a.log short;\n"
                 "upstream g { hash $arg_user consistent; server 127.0.0.1:9001 max_fails=3 "
                 "fail_timeout=5s; server 127.0.0.1:9002 max_conns=10; keepalive 4; }\n"
                 "proxy_set_header X-Env prod;\n"
                 "server { listen 127.0.0.1:8080 default_server; server_name a.test .b.test;\n"
                 "  client_max_body_size 4m; large_client_header_buffers 4 16k;\n"
                 "  location = /exact { return 204; }\n"
                 "  location ^~ /api/ { proxy_pass http://g/v1/; proxy_read_timeout 5m; "
                 "proxy_next_upstream off; }\n"
                 "  location /st { stub_status; access_log off; }\n}\n}\n")
    (tmp_path / "logs").mkdir()
    text = to_toml(str(path))
    toml_path = write(tmp_path, text, "converted.toml")
    a = load(str(path))
    b = config.load(str(toml_path))
    keep = dict(source="", format="", prefix=None, files=(), ignored=(), differences=())
    assert replace(a, **keep) == replace(b, **keep)
    assert b.processes == 2
    data = tomllib.loads(text)
    assert data["server"][0]["location"][1]["path"] == "^~ /api/"
    assert data["server"][0]["max_request_head"] == 65536


def test_proxy_set_header_follows_nginx_inheritance(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http("""
        upstream backend { server 127.0.0.1:9001; }
        proxy_set_header X-Http http;
        server {
            listen 127.0.0.1:8080;
            proxy_set_header X-Server server;
            proxy_set_header X-Real-IP $remote_addr;
            location /inherits { proxy_pass http://backend; }
            location /own { proxy_pass http://backend; proxy_set_header X-Own own; }
        }
        server {
            listen 127.0.0.1:8081;
            location / { proxy_pass http://backend; }
        }"""))))
    def headers(si: int, li: int) -> dict[str, str | None]:
        loc = cfg.servers[si].locations[li]
        return {n: v and v.text for n, v in loc.set_headers}
    assert headers(0, 0) == {"X-Server": "server", "X-Real-IP": "$remote_addr",
                             "Host": "$proxy_host",
                             "X-Forwarded-For": "$http_x_forwarded_for",
                             "X-Forwarded-Proto": "$http_x_forwarded_proto"}
    assert headers(0, 1) == {"X-Own": "own", "Host": "$proxy_host",
                             "X-Real-IP": "$http_x_real_ip",
                             "X-Forwarded-For": "$http_x_forwarded_for",
                             "X-Forwarded-Proto": "$http_x_forwarded_proto"}
    assert headers(1, 0)["X-Http"] == "http"


def test_http_and_server_settings_reach_the_locations(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http("""
        upstream backend { server 127.0.0.1:9001; }
        proxy_read_timeout 90s; keepalive_timeout 10s; client_max_body_size 0;
        server {
            listen 127.0.0.1:8080;
            proxy_connect_timeout 3s;
            client_header_timeout 7s;
            location / { proxy_pass http://backend; proxy_read_timeout 1h; }
            location /b { proxy_pass http://backend; }
        }"""))))
    (server,) = cfg.servers
    a, b = server.locations
    assert (a.read_timeout, b.read_timeout) == (3600, 90)
    assert a.connect_timeout == b.connect_timeout == 3
    assert a.keepalive_timeout == 10 and a.client_max_body_size == 0
    assert server.client_header_timeout == 7


def test_a_server_with_plain_and_tls_listeners_becomes_two(tmp_path: Path) -> None:
    import trustme
    issued = trustme.CA().issue_cert("example.com")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "c.crt"))
    issued.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    cfg = load(str(write(tmp_path, http("""
        server {
            listen 127.0.0.1:8080; listen 127.0.0.1:8443 ssl;
            server_name example.com;
            ssl_certificate c.crt; ssl_certificate_key c.key;
            ssl_protocols TLSv1.3;
            location / { return 200 ok; }
        }"""))))
    plain, secure = cfg.servers
    assert plain.tls is None and [a.port for a in plain.listen] == [8080]
    assert secure.tls is not None and secure.tls.protocols == ("TLSv1.3",)
    assert secure.tls.certificate == str(tmp_path / "c.crt")   # relative to the conf dir
    assert plain.locations == secure.locations


def test_worker_cpu_affinity(tmp_path: Path) -> None:
    site = "server { listen 127.0.0.1:8080; location / { return 200 ok; } }"
    cfg = load(str(write(tmp_path, "worker_cpu_affinity 01 10;\n" + http(site))))
    assert cfg.cpu_affinity == (frozenset({0}), frozenset({1}))
    cfg = load(str(write(tmp_path, "worker_cpu_affinity auto;\n" + http(site))))
    assert cfg.cpu_affinity == "auto"
    with pytest.raises(ConfigError, match="auto MASK"):
        load(str(write(tmp_path, "worker_cpu_affinity auto 11;\n" + http(site))))


def test_client_certificate_directives(tmp_path: Path) -> None:
    import trustme
    ca = trustme.CA()
    issued = ca.issue_cert("example.com")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "c.crt"))
    issued.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    site = ("server { listen 127.0.0.1:8443 ssl; ssl_certificate c.crt; "
            "ssl_certificate_key c.key; ssl_client_certificate clients.pem; "
            "ssl_verify_client %s; location / { return 200 ok; } }")
    cfg = load(str(write(tmp_path, http(site % "optional"))))
    tls = cfg.servers[0].tls
    assert tls is not None and (tls.verify_client, tls.client_ca) == (
        "optional", str(tmp_path / "clients.pem"))
    cfg = load(str(write(tmp_path, http(site % "on"))))
    assert any("ssl_verify_client on" in d for d in cfg.differences)
    with pytest.raises(ConfigError, match="optional_no_ca\\\": fastws checks every"):
        load(str(write(tmp_path, http(site % "optional_no_ca"))))


def test_redirect_to_https_and_server_level_return(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http("""
        server { listen 127.0.0.1:8080; return 301 https://$host$request_uri; }
        server { listen 127.0.0.1:8081; return 503 "down for maintenance"; }"""))))
    assert cfg.servers[0].redirect_https == 443 and cfg.servers[0].locations == ()
    (loc,) = cfg.servers[1].locations
    assert (loc.path, loc.return_status, loc.return_body) == ("/", 503, "down for maintenance")


def test_main_directives_and_the_prefix(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    (prefix / "logs").mkdir(parents=True)
    path = write(tmp_path, "user nobody;\nworker_processes auto;\npid run/fastws.pid;\n"
                 "error_log logs/error.log warn;\nworker_shutdown_timeout 30s;\n"
                 + http("access_log logs/access.log;\n" + SITE))
    cfg = config.load(str(path), prefix=str(prefix))
    assert cfg.user == ("nobody", "nogroup")
    assert cfg.processes >= 1
    assert cfg.pid == str(prefix / "run/fastws.pid")
    assert cfg.error_log.path == str(prefix / "logs/error.log")
    assert cfg.error_log.level == "warn"
    assert cfg.shutdown_timeout == 30
    assert cfg.servers[0].locations[0].access_log.path == str(prefix / "logs/access.log")
    # without -p, relative paths are under the configuration file's directory
    (tmp_path / "logs").mkdir()
    cfg = config.load(str(path))
    assert cfg.error_log.path == str(tmp_path / "logs/error.log")


# --- what fastws ignores, refuses, and does differently ------------------------------------------

def test_ignored_directives_are_listed_with_their_place(tmp_path: Path) -> None:
    path = write(tmp_path, "worker_rlimit_nofile 65535;\n" + MAIN + "http {\n"
                 "sendfile on;\ntcp_nopush on;\ninclude mime.types;\ndefault_type "
                 "application/octet-stream;\nproxy_temp_path /tmp/p;\n" + SITE + "\n}\n")
    write(tmp_path, "types {\n    text/html html;\n}\n", "mime.types")
    cfg = load(str(path))
    names = [line.split(": ")[1] for line in cfg.ignored]
    assert names == ["worker_rlimit_nofile", "sendfile", "tcp_nopush", "types",
                     "default_type", "proxy_temp_path"]
    assert cfg.ignored[0].startswith(f"{path}:1: worker_rlimit_nofile: ignored, ")
    assert cfg.ignored[3].startswith(f"{tmp_path}/mime.types:1: types: ignored, ")


def test_the_recipe_map_is_noted_as_a_stricter_difference(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http("map $http_upgrade $connection_upgrade {\n"
                                        "default upgrade;\n'' close;\n}\n" + SITE))))
    assert any("h2c" in line for line in cfg.differences)


@pytest.mark.parametrize("body, line, problem", [
    ("proxy_pas http://x;", 6, 'unknown directive "proxy_pas"'),
    ("proxy_read_timeout 5 minutes;", 6,
     'invalid number of arguments in "proxy_read_timeout" directive'),
    ("proxy_read_timeout 5mins;", 6, '"proxy_read_timeout": invalid value "5mins"'),
    ("client_max_body_size 10q;", 6, '"client_max_body_size": invalid value "10q"'),
    ("add_header X-A b;", 6, '"add_header": fastws does not add response headers'),
    ("proxy_socket_keepalive yes;", 6, 'it must be "on" or "off"'),
    ("listen 8081;", 6, '"listen" directive is not allowed here'),
    ("location /in { return 204; }", 6, "nested locations are not supported"),
    ("proxy_next_upstream error timeout http_502;", 6, "not on http_502"),
])
def test_a_mistake_is_one_line_with_file_and_line(tmp_path: Path, body: str, line: int,
                                                  problem: str) -> None:
    text = http("    upstream backend { server 127.0.0.1:9001; }\n    server {\n"
                "        listen 127.0.0.1:8080;\n        location / {\n"
                f"            proxy_pass http://backend;\n{body}\n        }}\n    }}")
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path}/nginx.conf:{line + 2}: "), message
    assert problem in message and "\n" not in message


def test_problems_found_by_the_common_checks_still_name_the_directive(tmp_path: Path) -> None:
    text = http("server {\n listen 127.0.0.1:8080;\n location / {\n"
                "  proxy_pass http://nowhere_group/;\n }\n}")
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path}/nginx.conf:6: \"proxy_pass\": "), message
    text = http("upstream u { server 127.0.0.1:9001 weight=0; }\n" + SITE)
    assert error_of(tmp_path, text).startswith(f"{tmp_path}/nginx.conf:3: ")
    text = http("server {\n listen 127.0.0.1:8080 ssl;\n ssl_certificate none.crt;\n"
                " ssl_certificate_key none.key;\n location / { return 204; }\n}")
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path}/nginx.conf:5: \"ssl_certificate\": "), message
    assert "no such file" in message


def test_every_directive_of_the_table_is_sound() -> None:
    for name, spec in SPECS.items():
        assert spec.contexts, name
        if spec.action in (IGNORE, REFUSE):
            assert spec.advice, name
        assert spec.max_args is None or spec.max_args >= spec.min_args, name


# --- the command ---------------------------------------------------------------------------------

def fastws(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastws", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_t_lists_ignored_and_differences_and_T_prints_the_files(tmp_path: Path) -> None:
    path = write(tmp_path, "daemon off;\n" + http("map $http_upgrade $connection_upgrade {\n"
                                                  "default upgrade;\n'' close;\n}\n" + SITE))
    r = fastws("-t", "-c", str(path))
    assert r.returncode == 0, r.stderr
    assert f"fastws: ignored: {path}:1: daemon: ignored, " in r.stdout
    assert "fastws: differs from nginx: " in r.stdout
    assert "test is successful" in r.stdout
    r = fastws("-T", "-c", str(path))
    assert r.returncode == 0, r.stderr
    assert f"# configuration file {path}:\ndaemon off;\n" in r.stdout
    toml = r.stdout.split("# as fastws runs it (fastws convert):\n", 1)[1]
    assert tomllib.loads(toml)["upstream"][0]["name"] == "backend"


def test_cli_convert_and_errors(tmp_path: Path) -> None:
    path = write(tmp_path, http(SITE))
    r = fastws("convert", str(path))
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["server"][0]["location"][0]["proxy_pass"] == "http://backend"
    bad = write(tmp_path, http(SITE.replace("weight=2", "weight=two")), "bad.conf")
    for args in (("convert", str(bad)), ("-t", "-c", str(bad))):
        r = fastws(*args)
        assert r.returncode == 1
        assert r.stderr == (f"fastws: {bad}:4: \"server\": invalid value \"two\" (a number, "
                            "at least 1)\n")
    r = fastws("-t", "--format", "nginx", "-c", str(write(tmp_path, "x = 1;\n", "a.toml")))
    assert r.returncode == 1 and "unknown directive \"x\"" in r.stderr


def test_docs_name_every_directive_of_the_table() -> None:
    from fastws.nginx.directives import markdown
    text = (Path(__file__).parent.parent / "docs" / "nginx.md").read_text()
    missing = [name for name in SPECS if f"`{name}" not in text]
    assert missing == []
    # the ignored and refused directives are listed as the table has them, with its words
    assert markdown(IGNORE) in text and markdown(REFUSE) in text


def test_proxy_protocol_directives(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http(
        "upstream backend { server 127.0.0.1:9001; send_proxy_protocol v2; }\n"
        "server { listen 127.0.0.1:8080; listen 127.0.0.1:8081 proxy_protocol;\n"
        "  set_real_ip_from 10.0.0.0/8; real_ip_header proxy_protocol;\n"
        "  location / { proxy_pass http://backend; } }"))))
    assert cfg.upstream("backend").send_proxy_protocol == 2
    # one server block per kind of address, as for ssl
    assert [(s.listen[0].port, s.proxy_protocol) for s in cfg.servers] == [(8080, False),
                                                                            (8081, True)]
    # the plain listener's block reads no PROXY header, so no address comes from one there
    assert [s.real_ip_from for s in cfg.servers] == [(), ("10.0.0.0/8",)]
    assert "send_proxy_protocol" in error_of(tmp_path, http(
        "server { listen 127.0.0.1:8080; proxy_protocol on; location / { return 204; } }"))


def test_limit_directives(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http(
        "limit_conn_zone $binary_remote_addr zone=addr:1m;\n"
        "limit_req_zone $binary_remote_addr zone=one:2m rate=30r/m;\n"
        "limit_conn addr 10; limit_req_status 429;\n"
        "server { listen 127.0.0.1:8080;\n"
        "  location / { return 204; }\n"
        "  location /ws { limit_req zone=one burst=5 delay=2; limit_conn addr 3;\n"
        "                 proxy_pass http://127.0.0.1:9001; } }"))))
    assert [(z.name, z.kind, z.size, z.rate) for z in cfg.limit_zones] == [
        ("addr", "conn", 1 << 20, 0), ("one", "req", 2 << 20, 500)]
    plain, ws = cfg.servers[0].locations
    assert plain.limit_conn == (config.LimitRule("addr", 10),) and plain.limit_req == ()
    assert ws.limit_conn == (config.LimitRule("addr", 3),)        # its own replace http's
    assert ws.limit_req == (config.LimitRule("one", 5, 2),) and ws.limit_req_status == 429
    for text, words in (
            ("limit_req_zone $binary_remote_addr zone=one:1m;", "invalid number of arguments"),
            ("limit_req_zone $binary_remote_addr zone=one:1m x=1;", "invalid parameter"),
            ("limit_req_zone $binary_remote_addr zone=one:1m rate=1r/s sync;", "NGINX Plus"),
            ("limit_conn_zone $binary_remote_addr zone=a:1m; limit_req zone=a;",
             "is a limit_conn_zone"),
            ("limit_req_zone $uri zone=a:1m rate=1r/s; limit_req zone=a rush=1;",
             "invalid parameter \"rush=1\""),
            ("limit_conn_dry_run on;", "fastws enforces its limits")):
        message = error_of(tmp_path, http(text + "\nserver { listen 127.0.0.1:8080; "
                                          "location / { proxy_pass http://127.0.0.1:1; } }"))
        assert words in message and "nginx.conf:" in message, message


def test_rules_before_a_return_are_said_to_differ(tmp_path: Path) -> None:
    # nginx answers `return` in its rewrite phase, before allow/deny and the limits
    path = write(tmp_path, http(
        "server { listen 127.0.0.1:8080; location / { deny all; return 200; }\n"
        "  location /x { return 204; } }"))
    assert read_translation(str(path)).differences == [
        f"{path}:3: return with allow/deny or limits: fastws applies the rules and limits "
        "first (nginx answers a return before them)"]


def test_sticky_cookie_as_nginx_writes_it(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http(
        "upstream backend { server 127.0.0.1:9001; server 127.0.0.1:9002;\n"
        "  sticky cookie srv_id expires=1h domain=.example.com path=/ httponly secure "
        "samesite=strict; }\n"
        "server { listen 127.0.0.1:8080; location / { proxy_pass http://backend; } }"))))
    sticky = cfg.upstream("backend").sticky
    assert sticky is not None
    assert sticky.attributes() == ("; Max-Age=3600; Domain=.example.com; Path=/; HttpOnly; "
                                   "Secure; SameSite=Strict")
    for bad, problem in (("sticky route $a $b;", "\"sticky route\" is not supported"),
                         ("sticky cookie a expires=soon;", "invalid value \"soon\""),
                         ("sticky cookie a flavour=x;", "invalid parameter \"flavour=x\"")):
        text = http("upstream backend { server 127.0.0.1:9001;\n" + bad + " }\nserver { listen "
                    "127.0.0.1:8080; location / { proxy_pass http://backend; } }")
        message = error_of(tmp_path, text)
        assert message.startswith(f"{tmp_path}/nginx.conf:4: ") and problem in message, message


def test_fastws_own_directives_for_the_origin_check(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http(
        "upstream backend { server 127.0.0.1:9001; }\n"
        "websocket_origins https://example.com https://*.example.com;\n"
        "server { listen 127.0.0.1:8080;\n"
        "  location /ws { proxy_pass http://backend; websocket_origin_missing deny; }\n"
        "  location /open { proxy_pass http://backend; websocket_origins https://a.test; } }"))))
    ws_loc, open_loc = cfg.servers[0].locations
    assert ws_loc.origins == ("https://example.com", "https://*.example.com")
    assert ws_loc.origin_missing == "deny" and open_loc.origins == ("https://a.test",)
    message = error_of(tmp_path, http("websocket_origins example.com;\n" + SITE))
    assert message.startswith(f"{tmp_path}/nginx.conf:3: \"websocket_origins\": "), message


def test_fastws_own_directives_for_tunnel_idleness_and_lifetime(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http(
        "upstream backend { server 127.0.0.1:9001; }\nwebsocket_idle_timeout 5m;\n"
        "server { listen 127.0.0.1:8080;\n"
        "  location /ws { proxy_pass http://backend; websocket_max_lifetime 1h 10m; } }"))))
    (loc,) = cfg.servers[0].locations
    assert (loc.idle_timeout, loc.max_tunnel_lifetime, loc.lifetime_spread) == (300, 3600, 600)
    message = error_of(tmp_path, http("upstream backend { server 127.0.0.1:9001; }\n"
                                      "server { listen 127.0.0.1:8080; location / {\n"
                                      "proxy_pass http://backend;\n"
                                      "websocket_max_lifetime 1m 2m; } }"))
    assert message.startswith(f"{tmp_path}/nginx.conf:6: \"websocket_max_lifetime\": "), message


def test_fastws_own_directives_for_websocket_frames(tmp_path: Path) -> None:
    from fastws.config import FramesConfig
    cfg = load(str(write(tmp_path, "websocket_close_spread 3s;\n" + http(
        "upstream backend { server 127.0.0.1:9001; }\nwebsocket_ping 20s 5s both;\n"
        "server { listen 127.0.0.1:8080;\n"
        "  location /ws { proxy_pass http://backend; websocket_max_message_size 1m;\n"
        "    websocket_frame_checks off; websocket_close_timeout 2s; }\n"
        "  location /raw { proxy_pass http://backend; websocket_frames off; } }"))))
    ws, raw = cfg.servers[0].locations
    assert ws.frames == FramesConfig(True, 1 << 20, False, 20.0, 5.0, "both", 2.0)
    assert not raw.frames.on and raw.frames.ping_interval == 0     # inherited, moot when blind
    assert cfg.close_spread == 3.0
    message = error_of(tmp_path, http("upstream backend { server 127.0.0.1:9001; }\n"
                                      "server { listen 127.0.0.1:8080; location / {\n"
                                      "proxy_pass http://backend;\n"
                                      "websocket_ping 10s sometimes; } }"))
    assert message.startswith(f"{tmp_path}/nginx.conf:6: \"websocket_ping\": "), message


# --- robustness: any text gives a configuration or one ConfigError, never another exception --

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from support import fuzz_examples  # noqa: E402

_WORDS = st.sampled_from([
    "server", "location", "upstream", "map", "listen", "proxy_pass", "http", "events",
    "include", "return", "set_real_ip_from", "allow", "deny", "sticky", "hash", "ip_hash",
    "proxy_set_header", "log_format", "access_log", "server_name", "websocket_origins",
    "~", "~*", "=", "^~", "/", "/ws", "127.0.0.1:8080", "http://backend", "http://$x",
    "backend", "cookie", "off", "on", "60s", "5q", "$host", "${host}x", "'quoted word'",
    '"a;b"', "\\\"", "#", "\n", "default", "hostnames", "*.example.com", "10.0.0.0/8"])
_TOKENS = st.one_of(_WORDS, st.sampled_from([";", "{", "}", " ", "\n"]),
                    st.text(alphabet="abc$/{};'\"\\ \n#~*:=.", max_size=6))


@settings(max_examples=fuzz_examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
@given(st.lists(_TOKENS, max_size=60))
def test_any_text_is_a_configuration_or_one_error(tmp_path: Path, tokens: list[str]) -> None:
    path = tmp_path / "fuzz.conf"
    path.write_text(MAIN + "http {\n" + " ".join(tokens) + "\n}\n" if tokens and
                    tokens[0] != "events" else " ".join(tokens))
    try:
        load(str(path))
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_forwarded_headers_directive(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, http("forwarded_headers replace;\n" + SITE))))
    (loc,) = cfg.servers[0].locations
    assert loc.forwarded_headers == "replace"
    assert {n: v and v.text for n, v in loc.set_headers}["X-Real-IP"] == "$remote_addr"
    message = error_of(tmp_path, http("forwarded_headers maybe;\n" + SITE))
    assert message.startswith(f"{tmp_path}/nginx.conf:3: \"forwarded_headers\": "), message
