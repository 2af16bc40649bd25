"""Configuration: every mistake is one line naming the file, the key and the problem."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastws import config, variables
from fastws.errors import ConfigError
from support import to_toml


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("60s", 60), ("5m", 300), ("1h", 3600), ("7d", 604800), ("1h30m", 5400),
    ("3600", 3600), (2.5, 2.5), ("1w", 604800),
])
def test_durations_in_nginx_units(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-1s", "s", "1.5.2s", True])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        config.parse_duration(text)


@pytest.mark.parametrize("text, size", [("512", 512), ("16k", 16384), ("1m", 1 << 20),
                                        ("2G", 2 << 30), (100, 100)])
def test_sizes(text, size):
    assert config.parse_size(text) == size


def minimal(**location):
    loc = {"path": "/ws", "proxy_pass": "backend"}
    loc.update(location)
    return {"upstream": [{"name": "backend", "servers": ["127.0.0.1:9001"]}],
            "server": [{"listen": ["127.0.0.1:8080"], "location": [loc]}]}


def test_defaults_are_nginx_defaults():
    cfg = config.from_dict(minimal())
    loc = cfg.servers[0].locations[0]
    assert (loc.connect_timeout, loc.send_timeout, loc.read_timeout) == (60, 60, 60)
    assert loc.websocket and loc.upgrade_tokens == ("websocket",)
    assert cfg.servers[0].client_header_timeout == 60


def test_proxy_pass_url_makes_an_implicit_upstream():
    data = minimal(proxy_pass="http://127.0.0.1:9002/api/")
    cfg = config.from_dict(data)
    loc = cfg.servers[0].locations[0]
    assert loc.proxy_pass == "http://127.0.0.1:9002" and loc.proxy_uri == "/api/"
    assert cfg.upstream("http://127.0.0.1:9002").servers[0].address == "127.0.0.1:9002"


def test_recipe_timeouts_and_headers():
    cfg = config.from_dict(minimal(connect_timeout="7d", send_timeout="3600s",
                                   read_timeout="3600s",
                                   set_headers={"X-Forwarded-Proto": "$scheme", "X-Gone": ""}))
    loc = cfg.servers[0].locations[0]
    assert loc.connect_timeout == 7 * 86400 and loc.read_timeout == 3600
    assert loc.set_headers[0][1].parts == ((variables.NUMBERS["scheme"], ""),)
    assert loc.set_headers[1] == ("X-Gone", None)


@pytest.mark.parametrize("mutate, key, problem", [
    (lambda d: d["server"][0]["location"][0].update(bogus=1),
     "server[0].location['/ws'].bogus", "unknown key"),
    (lambda d: d["server"][0]["location"][0].update(read_timeout="5 minutes"),
     "server[0].location['/ws'].read_timeout", "is not a duration"),
    (lambda d: d["server"][0]["location"][0].update(read_timeout=True),
     "server[0].location['/ws'].read_timeout", "a duration is a string"),
    (lambda d: d["server"][0]["location"][0].update(proxy_pass="nowhere"),
     "server[0].location[0].proxy_pass", "unknown upstream 'nowhere'"),
    (lambda d: d["server"][0].update(listen=["127.0.0.1:99999"]),
     "server[0].listen[0]", "is not a port number"),
    (lambda d: d["server"][0].update(listen=["::1:80"]),
     "server[0].listen[0]", "write an IPv6 address in brackets"),
    (lambda d: d["upstream"][0].update(servers=[{"address": "127.0.0.1:1", "weight": 0}]),
     "upstream.backend.servers[0].weight", "must be at least 1"),
    (lambda d: d["upstream"][0].update(balance="random"),
     "upstream.backend.balance", "unknown method 'random'"),
    (lambda d: d["upstream"][0].update(servers="127.0.0.1:1"),
     "upstream.backend.servers", "expected a list"),
    (lambda d: d["server"][0]["location"][0].update(set_headers={"Bad Name": "x"}),
     "server[0].location['/ws'].set_headers.Bad Name", "not a valid header name"),
    (lambda d: d["server"][0]["location"][0].update(set_headers={"X-A": "$nosuchvar"}),
     "server[0].location['/ws'].set_headers.X-A", "unknown variable $nosuchvar"),
    (lambda d: d["server"][0]["location"][0].update(upgrade_tokens=["h2c"]),
     "server[0].location['/ws'].upgrade_tokens", "h2c cannot be tunnelled"),
    (lambda d: d["server"][0]["location"][0].update(path="ws"),
     "server[0].location[0].path", "must start with '/'"),
    (lambda d: d["server"][0]["location"].append({"path": "/ws", "proxy_pass": "backend"}),
     "server[0].location[1].path", "duplicate location '/ws'"),
    (lambda d: d.update(processes=0), "processes", "expected a number of processes"),
    (lambda d: d.pop("server"), "server", "needs at least one [[server]]"),
])
def test_mistakes_name_the_key(mutate, key, problem):
    data = minimal()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        config.from_dict(data, "fastws.toml")
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith(f"fastws.toml: {key}: ")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastws", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_prints_upstreams_and_succeeds(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(to_toml(minimal()))
    result = run_cli("-t", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "backend" in result.stdout and "127.0.0.1:9001" in result.stdout
    assert "test is successful" in result.stdout


@pytest.mark.parametrize("text, expected", [
    ('[[server]]\nlisten = ["127.0.0.1:8080"]\n[[server.location]]\npath = "/"\n'
     'proxy_pass = "http://127.0.0.1:1"\nread_timeout = "soon"\n',
     "server[0].location['/'].read_timeout: 'soon' is not a duration"),
    ("[[server]\n", "not valid TOML"),
    ('worker_connections = "many"\n[[server]]\nlisten = ["127.0.0.1:1"]\n',
     "worker_connections: expected an integer, got a string"),
])
def test_a_bad_file_is_one_line_and_exit_1(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for args in (("-t", "-c", str(path)), ("-c", str(path))):
        result = run_cli(*args)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"fastws: {path}: ")
        assert expected in lines[0]
        assert "Traceback" not in result.stderr


def test_missing_file(tmp_path):
    result = run_cli("-t", "-c", str(tmp_path / "absent.toml"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"fastws: {tmp_path / 'absent.toml'}: no such file"


def test_listen_address_in_use_is_one_line(tmp_path):
    import socket
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    data = minimal()
    data["server"][0]["listen"] = [f"127.0.0.1:{port}"]
    path = tmp_path / "busy.toml"
    path.write_text(to_toml(data))
    result = run_cli("-c", str(path))
    busy.close()
    assert result.returncode == 1
    assert result.stderr.strip() == \
        f"fastws: cannot listen: 127.0.0.1:{port}: Address already in use"


def test_version():
    import fastws
    result = run_cli("--version")
    assert result.stdout.strip() == f"fastws {fastws.__version__}"


def test_location_forms_as_nginx_writes_them():
    data = {"server": [{"listen": ["127.0.0.1:8080"], "location": [
                {"path": "= /a", "return": 201}, {"path": "^~ /b", "return": 202},
                {"path": "~ ^/c/[0-9]+$", "return": 203}, {"path": "~* \\.png$", "return": 204},
                {"path": "/b/c", "return": 205}]}]}
    cfg = config.from_dict(data)
    locs = cfg.servers[0].locations
    assert [(loc.path, loc.exact, loc.noregex, loc.regex, loc.caseless) for loc in locs] == [
        ("/a", True, False, None, False), ("/b", False, True, None, False),
        ("^/c/[0-9]+$", False, False, "^/c/[0-9]+$", False),
        ("\\.png$", False, False, "\\.png$", True), ("/b/c", False, False, None, False)]
    assert [loc.written for loc in locs] == ["= /a", "^~ /b", "~ ^/c/[0-9]+$", "~* \\.png$",
                                             "/b/c"]


@pytest.mark.parametrize("locations, problem", [
    ([{"path": "~ ^/(a", "return": 200}], "missing closing parenthesis at offset 4"),
    ([{"path": "~ ", "return": 200}], "an empty pattern"),
    ([{"path": "~ ^/a", "proxy_pass": "http://127.0.0.1:9000/x"}],
     "cannot replace a matched prefix"),
    ([{"path": "/a", "return": 200}, {"path": "^~ /a", "return": 200}], "duplicate location"),
    ([{"path": "a", "return": 200}], "must start with '/'"),
])
def test_location_mistakes(locations, problem):
    data = {"server": [{"listen": ["127.0.0.1:8080"], "location": locations}]}
    with pytest.raises(ConfigError, match=problem):
        config.from_dict(data)


def test_maps_are_read_in_nginx_terms():
    data = minimal(set_headers={"X-Tier": "$tier"})
    data["map"] = [
        {"variable": "$tier", "source": "$tenant", "default": "bronze",
         "values": [["MAIN", "gold"], ["~*^o", "silver"]]},
        {"variable": "tenant", "source": "$http_host", "hostnames": True,
         "values": [[".example.net", "net"], ["*.example.org", "org"], ["www.example.*", "w"],
                    ["\\~literal", "x"]]}]
    cfg = config.from_dict(data)
    tier, tenant = cfg.maps
    assert [k for k, _ in tier.exact] == ["main"] and tier.regex[0][:2] == ("^o", True)
    assert [k for k, _ in tenant.exact] == ["example.net", "~literal"]
    assert [k for k, _ in tenant.head] == [".example.net", ".example.org"]
    assert [k for k, _ in tenant.tail] == ["www.example."]
    (name, value), = [h for h in cfg.servers[0].locations[0].set_headers if h[0] == "X-Tier"]
    assert value is not None and value.parts == ((variables.NUMBERS["map_"], "0"),)


@pytest.mark.parametrize("maps, key, problem", [
    ([{"variable": "host", "source": "$uri"}], "map[0].variable", "already a variable"),
    ([{"variable": "a", "source": "$uri"}, {"variable": "a", "source": "$uri"}],
     "map[1].variable", "duplicate map"),
    ([{"variable": "a", "source": "$b"}, {"variable": "b", "source": "$uri", "default": "$a"}],
     "map.a", "depends on itself"),
    ([{"variable": "a", "source": "$uri", "values": [["~(", "x"]]}], "map.a.values[0]",
     "missing closing parenthesis"),
    ([{"variable": "a", "source": "$nope"}], "map.a.source", "unknown variable"),
    ([{"variable": "a", "source": "$uri", "values": [["x", "1"], ["X", "2"]]}],
     "map.a.values[1]", "duplicate value"),
])
def test_map_mistakes(maps, key, problem):
    data = minimal()
    data["map"] = maps
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    assert info.value.key == key and problem in info.value.problem


def test_proxy_pass_with_variables():
    cfg = config.from_dict(minimal(proxy_pass="http://$http_x_pool/v1$uri"))
    loc = cfg.servers[0].locations[0]
    assert loc.proxy_pass is None and loc.proxy_pass_template is not None
    assert loc.proxy_pass_template.variables == ("http_x_pool", "uri")
    for value, problem in (("https://$x", "http://NAME"), ("http://$nope_", "unknown variable")):
        with pytest.raises(ConfigError, match=problem):
            config.from_dict(minimal(proxy_pass=value))


def test_access_rules():
    data = minimal(access=["allow 10.1.2.3/8", "allow ::1", "deny all"])
    data["server"][0]["access"] = ["deny 192.0.2.0/24"]
    data["server"][0]["location"].append({"path": "/other", "return": 204})
    cfg = config.from_dict(data)
    own, inherited = cfg.servers[0].locations
    assert own.access == ((True, "10.0.0.0/8"), (True, "::1/128"), (False, "all"))
    assert inherited.access == ((False, "192.0.2.0/24"),)
    for bad in (["permit 10.0.0.0/8"], ["allow 10.0.0.300"], ["deny"]):
        with pytest.raises(ConfigError, match=r"access\[0\]"):
            config.from_dict(minimal(access=bad))


def test_real_ip_settings():
    data = minimal()
    data["server"][0]["real_ip"] = {"from": ["10.0.0.1/8", "::1"], "header": "X-Forwarded-For",
                                    "recursive": True}
    server = config.from_dict(data).servers[0]
    assert server.real_ip_from == ("10.0.0.0/8", "::1/128")
    assert (server.real_ip_header, server.real_ip_recursive) == ("X-Forwarded-For", True)
    for bad, key in (({"from": []}, "real_ip.from"), ({"from": ["x"]}, "real_ip.from[0]"),
                     ({"from": ["::1"], "header": "a b"}, "real_ip.header")):
        data["server"][0]["real_ip"] = bad
        with pytest.raises(ConfigError) as info:
            config.from_dict(data)
        assert info.value.key == f"server[0].{key}"


def test_proxy_protocol_settings():
    data = minimal()
    data["server"][0].update(proxy_protocol=True,
                             real_ip={"from": ["10.0.0.0/8"], "header": "PROXY_protocol"})
    data["upstream"][0]["send_proxy_protocol"] = "v2"
    cfg = config.from_dict(data)
    assert cfg.servers[0].proxy_protocol and cfg.servers[0].real_ip_header == "proxy_protocol"
    assert cfg.upstreams[0].send_proxy_protocol == 2
    bad_cases = (
        ({"proxy_protocol": False}, {}, "server[0].real_ip", "needs proxy_protocol = true"),
        ({}, {"send_proxy_protocol": "v3"}, "upstream.backend.send_proxy_protocol", "v3"),
        ({}, {"keepalive": 2}, "upstream.backend.send_proxy_protocol", "cannot be kept alive"),
    )
    for server, upstream, key, words in bad_cases:
        broken = minimal()
        broken["server"][0].update(data["server"][0], **server)
        broken["upstream"][0].update(data["upstream"][0], **upstream)
        with pytest.raises(ConfigError, match=words) as info:
            config.from_dict(broken)
        assert info.value.key == key
    # every server on an address agrees (as on TLS)
    data["server"].append({"listen": ["127.0.0.1:8080"], "server_name": ["b"],
                           "location": [{"path": "/", "return": 204}]})
    with pytest.raises(ConfigError, match="reads the PROXY protocol in server\\[0\\]") as info:
        config.from_dict(data)
    assert info.value.key == "server[1].proxy_protocol"


def test_limit_settings():
    data = minimal(limit_req=[{"zone": "r", "burst": 3, "delay": 1}], limit_req_status=429)
    data["limit_conn_zone"] = [{"name": "c", "key": "$binary_remote_addr", "size": "1m"}]
    data["limit_req_zone"] = [{"name": "r", "key": "$remote_addr", "rate": "30r/m"}]
    data["server"][0]["limit_conn"] = {"zone": "c", "max": 4}      # inherited by the location
    cfg = config.from_dict(data)
    assert cfg.limit_zones[1].rate == 500                           # nginx's units
    loc = cfg.servers[0].locations[0]
    assert loc.limit_conn == (config.LimitRule("c", 4),)
    assert loc.limit_req == (config.LimitRule("r", 3, 1),) and loc.limit_req_status == 429
    for change, key, words in (
            ({"limit_conn": {"zone": "r", "max": 1}}, "limit_conn[0].zone", "limit_req_zone"),
            ({"limit_conn": {"zone": "x", "max": 1}}, "limit_conn[0].zone", "unknown"),
            ({"limit_conn": {"zone": "c"}}, "limit_conn[0].max", "required"),
            ({"limit_req": {"zone": "r", "nodelay": True, "delay": 2}}, "limit_req[0].delay",
             "conflicts"),
            ({"limit_req_status": 200}, "limit_req_status", "between 400 and 599")):
        bad = minimal(**change)
        bad["limit_conn_zone"], bad["limit_req_zone"] = data["limit_conn_zone"], \
            data["limit_req_zone"]
        with pytest.raises(ConfigError, match=words) as info:
            config.from_dict(bad)
        assert info.value.key == f"server[0].location['/ws'].{key}"
    for zone, key, words in (({"rate": "fast"}, "rate", "requests per second"),
                             ({"size": "1k"}, "size", "at least 32k"),
                             ({"key": None}, "key", "required")):
        bad = minimal()
        bad["limit_req_zone"] = [{k: v for k, v in dict(data["limit_req_zone"][0], **zone)
                                  .items() if v is not None}]
        with pytest.raises(ConfigError, match=words) as info:
            config.from_dict(bad)
        assert info.value.key == f"limit_req_zone[0].{key}"


def test_frame_settings():
    loc = config.from_dict(minimal()).servers[0].locations[0]
    assert loc.frames == config.FramesConfig()           # on, no limit, checked, no pings
    assert loc.frames.on and loc.frames.checks and not loc.frames.ping_interval
    loc = config.from_dict(minimal(max_message_size="1m", ping_interval="20s",
                                   ping_timeout="5s", ping_to="both", close_timeout="2s",
                                   frame_checks=False)).servers[0].locations[0]
    assert loc.frames == config.FramesConfig(True, 1 << 20, False, 20.0, 5.0, "both", 2.0)
    assert config.from_dict(dict(minimal(), close_spread="5s")).close_spread == 5.0
    for location, key, words in (
            ({"ping_to": "server"}, "ping_to", "client, upstream, both"),
            ({"max_message_size": "4g"}, "max_message_size", "below 4g"),
            ({"close_timeout": "0s"}, "close_timeout", "greater than zero"),
            ({"frames": False, "ping_interval": "10s"}, "ping_interval", "frames = true"),
            ({"frames": False, "max_message_size": "1m"}, "max_message_size", "frames = true")):
        with pytest.raises(ConfigError, match=words) as info:
            config.from_dict(minimal(**location))
        assert info.value.key.endswith(f".{key}")


# --- robustness: any table is a configuration or one ConfigError, never another exception ----

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from support import fuzz_examples  # noqa: E402

_KEYS = ["server", "upstream", "map", "location", "listen", "path", "proxy_pass", "servers",
         "address", "weight", "balance", "hash_key", "sticky", "cookie", "access", "origins",
         "real_ip", "from", "header", "set_headers", "return", "status", "tls", "values",
         "variable", "source", "default", "idle_timeout", "max_tunnel_lifetime",
         "lifetime_spread", "log_format", "access_log", "processes", "user", "error_log",
         "proxy_protocol", "send_proxy_protocol", "limit_conn_zone", "limit_req_zone",
         "limit_conn", "limit_req", "zone", "rate", "burst", "max", "frames",
         "max_message_size", "ping_interval", "ping_to", "close_spread"]
_SCALARS = st.one_of(st.sampled_from(["127.0.0.1:8080", "/", "~ ^/a", "= /x", "backend",
                                      "http://backend", "http://$host", "allow all",
                                      "deny 10.0.0.0/8", "60s", "5q", "$uri", "https://*.a",
                                      "hash", "ip_hash", "x", "", "v1", "proxy_protocol", "1r/s"]),
                     st.integers(-2, 70000), st.booleans())
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5)),
    max_leaves=25)


@settings(max_examples=fuzz_examples(400), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6))
def test_any_table_is_a_configuration_or_one_error(tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)          # log files a table names are opened (made) here
    try:
        config.from_dict(data)
    except ConfigError as exc:
        assert "\n" not in str(exc)
