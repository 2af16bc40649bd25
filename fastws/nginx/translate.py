"""An nginx configuration, read as a tree of directives, turned into the TOML-shaped table that
config.from_dict checks: one checked configuration object for both formats.

nginx's inheritance is resolved here: a directive written at http or server level applies to
the levels below that do not set it themselves (ngx_conf_merge_*), and a level that has any
`proxy_set_header` replaces every inherited one (ngx_http_proxy_merge_loc_conf).  Each key of
the table remembers the directive it came from, so that a problem found later is still
reported as FILE:LINE.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import parse_duration, parse_size
from ..errors import ConfigError
from .. import variables
from ..variables import parse_template
from .directives import (EVENTS, HTTP, IGNORE, LOCATION, MAIN, REFUSE, SERVER, SPECS,
                         UPSTREAM)
from .syntax import Directive, Tree, one_line

# a `listen`: address, ssl, default_server, the directive, proxy_protocol
Listen = tuple[str, bool, bool, Directive, bool]


@dataclass(slots=True)
class Translation:
    data: dict[str, Any]
    positions: dict[str, Directive]     # a key of `data` (as config.py names it) -> directive
    ignored: list[str] = field(default_factory=list)      # "FILE:LINE: name: why"
    differences: list[str] = field(default_factory=list)  # "FILE:LINE: what fastws does"
    files: list[str] = field(default_factory=list)


def fail(d: Directive, problem: str) -> ConfigError:
    return ConfigError(d.where, "", one_line(problem))


# --- values in nginx's units -------------------------------------------------------------------

def _checked(d: Directive, text: str, parse: Any, example: str) -> str:
    """The value as written, once nginx's unit parser (config.py's) accepts it."""
    try:
        parse(text)
    except ValueError:
        raise fail(d, f"\"{d.name}\": invalid value \"{text}\" ({example})") from None
    return text


def _time(d: Directive, text: str) -> str:
    return _checked(d, text, parse_duration, "a time such as 60s, 5m, 1h or 7d")


def _size(d: Directive, text: str) -> str:
    return _checked(d, text, parse_size, "a size such as 512, 16k or 1m")


def _int(d: Directive, text: str, minimum: int = 0) -> int:
    if not text.isdigit() or int(text) < minimum:
        raise fail(d, f"\"{d.name}\": invalid value \"{text}\" (a number, at least {minimum})")
    return int(text)


def _callable(d: Directive) -> str:
    # "package.module:function", or off
    return "" if d.args[0] == "off" else d.args[0]


def _flag(d: Directive) -> bool:
    value = d.args[0].lower()
    if value not in ("on", "off"):
        raise fail(d, f"\"{d.name}\": invalid value \"{d.args[0]}\", it must be \"on\" or "
                   "\"off\"")
    return value == "on"


def _template(d: Directive, text: str) -> str:
    try:
        parse_template(text)
    except ValueError as exc:
        raise fail(d, f"\"{d.name}\": {exc}") from None
    return text


# --- the walk ------------------------------------------------------------------------------------

_FORWARDED = ("X-Real-IP", "X-Forwarded-For", "X-Forwarded-Proto")
_OWN_FORWARDED = {"X-Real-IP": "$remote_addr", "X-Forwarded-For": "$proxy_add_x_forwarded_for",
                  "X-Forwarded-Proto": "$scheme"}
# directives that make a list at each level: the settings key each adds to
_LISTED = {"set_real_ip_from": "real_ip_from", "allow": "access", "deny": "access",
           "limit_conn": "limit_conn", "limit_req": "limit_req",
           "proxy_set_header": "proxy_set_header"}
_LISTEN_IGNORED = {
    "reuseport": "reuseport: each fastws worker has its own listening socket already",
    "backlog": "backlog: fastws's listen queue is 4096 (capped by net.core.somaxconn)",
    "deferred": "deferred: fastws's listeners always defer accept to the first bytes",
}


class _Translator:
    def __init__(self, tree: Tree, prefix: str, conf_prefix: str) -> None:
        self.tree = tree
        self.prefix = prefix
        self.conf_prefix = conf_prefix
        self.out = Translation({}, {}, files=list(tree.files))
        self.maps: dict[str, Directive] = {}
        self.upstreams: dict[str, dict[str, Any]] = {}
        self.noted: set[str] = set()

    # where things go
    def at(self, key: str, d: Directive) -> None:
        self.out.positions.setdefault(key, d)

    def ignore(self, d: Directive, why: str) -> None:
        self.out.ignored.append(f"{d.where}: {d.name}: ignored, {why}")

    def differ(self, d: Directive, what: str, once: str | None = None) -> None:
        if once is not None:
            if once in self.noted:
                return
            self.noted.add(once)
        self.out.differences.append(f"{d.where}: {what}")

    def path(self, text: str, conf: bool = False) -> str:
        """nginx's ngx_conf_full_name: relative to the prefix, or (conf) to the conf prefix."""
        if text == "stderr" or os.path.isabs(text):
            return text
        return os.path.normpath(os.path.join(self.conf_prefix if conf else self.prefix, text))

    def check(self, d: Directive, context: str) -> str:
        """The directive's action after checking where it is and its arguments."""
        spec = SPECS.get(d.name)
        if spec is None:
            raise fail(d, f"unknown directive \"{d.name}\"")
        if context not in spec.contexts:
            raise fail(d, f"\"{d.name}\" directive is not allowed here")
        if spec.action == REFUSE:
            raise fail(d, f"\"{d.name}\": {spec.advice}")
        is_block = spec.block or (d.name == "server" and context == HTTP)
        if is_block and d.block is None:
            raise fail(d, f"directive \"{d.name}\" has no opening \"{{\"")
        if not is_block and d.block is not None:
            raise fail(d, f"directive \"{d.name}\" is not terminated by \";\"")
        n = len(d.args)
        lo, hi = spec.min_args, spec.max_args
        if d.name == "server" and context == UPSTREAM:
            lo, hi = 1, None
        if n < lo or (hi is not None and n > hi):
            raise fail(d, f"invalid number of arguments in \"{d.name}\" directive")
        if spec.action == IGNORE:
            self.ignore(d, spec.advice)
        return spec.action

    # main and events
    def run(self) -> Translation:
        body = self.tree.body
        snippet = not any(d.name == "http" for d in body) and any(
            d.name in SPECS and MAIN not in SPECS[d.name].contexts
            and HTTP in SPECS[d.name].contexts for d in body)
        data = self.out.data
        http_blocks: list[list[Directive]] = []
        top_http: list[Directive] = []
        for d in body:
            if snippet and d.name in SPECS and MAIN not in SPECS[d.name].contexts:
                top_http.append(d)
                continue
            if self.check(d, MAIN) == IGNORE:
                continue
            if d.name == "user":
                data["user"] = " ".join(d.args)
                self.at("user", d)
            elif d.name == "worker_processes":
                data["processes"] = "auto" if d.args[0] == "auto" else _int(d, d.args[0], 1)
                self.at("processes", d)
            elif d.name == "worker_cpu_affinity":
                # "auto" (an optional mask after it restricts the CPUs: not supported), or masks
                if d.args[0] == "auto":
                    if len(d.args) > 1:
                        raise fail(d, "\"worker_cpu_affinity auto MASK\": fastws's auto uses "
                                   "every CPU the process may run on (use taskset to restrict)")
                    data["worker_cpu_affinity"] = "auto"
                else:
                    data["worker_cpu_affinity"] = list(d.args)
                self.at("worker_cpu_affinity", d)
            elif d.name == "pid":
                data["pid"] = self.path(d.args[0])
                self.at("pid", d)
            elif d.name == "error_log":
                self.error_log(d)
            elif d.name == "worker_shutdown_timeout":
                data["shutdown_timeout"] = _time(d, d.args[0])
                self.at("shutdown_timeout", d)
            elif d.name == "websocket_close_spread":
                data["close_spread"] = _time(d, d.args[0])
                self.at("close_spread", d)
            elif d.name == "events":
                for e in d.block or ():
                    if self.check(e, EVENTS) == IGNORE:
                        continue
                    if e.name == "worker_connections":
                        data["worker_connections"] = _int(e, e.args[0], 2)
                        self.at("worker_connections", e)
            elif d.name == "http":
                http_blocks.append(d.block or [])
        if snippet:
            http_blocks.append(top_http)
        if len(http_blocks) > 1:
            raise fail(next(d for d in body if d.name == "http"), "\"http\" directive is "
                       "duplicate")
        if not http_blocks:
            raise ConfigError(self.tree.files[0], "", "no \"http\" block: fastws needs at "
                              "least one server { } in http { }")
        self.http(http_blocks[0])
        return self.out

    def error_log(self, d: Directive) -> None:
        path = d.args[0]
        if path.startswith(("syslog:", "memory:")):
            raise fail(d, f"\"error_log\": fastws writes to a file or stderr, not {path}")
        level = d.args[1] if len(d.args) > 1 else "error"
        levels = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
        if level not in levels:
            raise fail(d, f"\"error_log\": invalid log level \"{level}\"")
        level = "crit" if level in ("alert", "emerg") else level
        self.out.data["error_log"] = {"path": self.path(path), "level": level}
        self.at("error_log", d)

    # http
    def http(self, body: list[Directive]) -> None:
        data = self.out.data
        settings: dict[str, Any] = {}
        servers: list[Directive] = []
        for d in body:
            if self.check(d, HTTP) == IGNORE:
                continue
            if d.name == "upstream":
                self.upstream(d)
            elif d.name == "map":
                self.map(d)
            elif d.name == "log_format":
                self.log_format(d)
            elif d.name in ("limit_conn_zone", "limit_req_zone"):
                self.limit_zone(d)
            elif d.name == "server":
                servers.append(d)
            elif d.name == "error_log":
                if "error_log" not in data:
                    self.error_log(d)
                else:
                    self.ignore(d, "fastws keeps one error log, the main one")
            elif d.name == "resolver":
                self.resolver(d)
            elif d.name == "resolver_timeout":
                data.setdefault("resolver", {})["timeout"] = _time(d, d.args[0])
                self.at("resolver.timeout", d)
            else:
                self.setting(settings, d)
        if "access_log" in settings:
            data["access_log"] = self.access_log(settings.pop("access_log"))
            self.at("access_log", settings.pop("@access_log"))
        if not servers:
            raise ConfigError(self.tree.files[0], "", "no server { } block: fastws needs at "
                              "least one")
        data["upstream"] = list(self.upstreams.values())
        data["server"] = []
        for d in servers:
            self.server(d, settings)
        if not data["upstream"]:
            del data["upstream"]

    def resolver(self, d: Directive) -> None:
        # resolver ADDRESS... [valid=TIME] [ipv4=on|off] [ipv6=on|off] (http level): where the
        # `resolve` servers' names are looked up
        out = self.out.data.setdefault("resolver", {})
        addresses = []
        for a in d.args:
            key, _, value = a.partition("=")
            if key == "valid" and value:
                # nginx keeps an answer exactly this long, whatever its TTL
                out["min_ttl"] = out["max_ttl"] = _time(d, value)
            elif key in ("ipv4", "ipv6") and value in ("on", "off"):
                out[key] = value == "on"
            elif key == "status_zone":
                self.ignore(d, "status_zone=: fastws's status pages need no zone")
            else:
                addresses.append(a)
        out["addresses"] = addresses
        self.at("resolver", d)
        self.at("resolver.addresses", d)

    def setting(self, settings: dict[str, Any], d: Directive) -> None:
        """A directive that lower levels inherit: kept as written until a location or
        server needs it."""
        listed = _LISTED.get(d.name)
        if listed is not None:
            if d.name in ("set_real_ip_from", "allow", "deny") and d.args[0].startswith("unix:"):
                raise fail(d, f"\"{d.name}\": fastws listens on IP addresses only")
            # nginx's merge of these: a level with any replaces the whole inherited list
            if settings.get(f"@own_{listed}") is not settings:
                settings[listed] = []
                settings[f"@own_{listed}"] = settings
            settings[listed].append(d)
        elif d.name == "access_log":
            if settings.get("@own_log") is settings:
                raise fail(d, "\"access_log\": fastws writes one access log per level "
                           "(nginx may write several)")
            settings["@own_log"] = settings
            settings["access_log"] = d
            settings["@access_log"] = d
        elif d.name in ("resolver", "resolver_timeout"):
            # (the http level's is the one: fastws looks names up for upstreams only)
            self.ignore(d, "fastws looks upstream names up through the http level's resolver")
        elif d.name == "gzip":
            if _flag(d):
                # compression is the client's option, never something it can rely on: the
                # same content reaches it, uncompressed
                self.differ(d, "gzip on: fastws does not compress answers; they reach the "
                            "client as the upstream sent them", once="gzip")
            else:
                self.ignore(d, "off, as fastws does")
        elif d.name == "charset":
            if d.args[0] != "off":
                raise fail(d, "\"charset\": fastws relays answers as the upstream sent them: "
                           "remove the line")
            self.ignore(d, "off, as fastws does")
        elif d.name == "underscores_in_headers":
            if not _flag(d):
                self.differ(d, "underscores_in_headers off: nginx drops request headers "
                            "whose names hold \"_\"; fastws passes them on")
        else:
            if d.name in settings and settings.get("@level_" + d.name) is settings:
                raise fail(d, f"\"{d.name}\" directive is duplicate")
            settings[d.name] = d
            settings["@level_" + d.name] = settings

    def access_log(self, d: Directive) -> Any:
        if d.args[0] == "off":
            if len(d.args) > 1:
                raise fail(d, "invalid number of arguments in \"access_log\" directive")
            return False
        if d.args[0].startswith("syslog:"):
            raise fail(d, "\"access_log\": fastws writes to a file or stderr, not syslog")
        log: dict[str, Any] = {"path": self.path(d.args[0])}
        if len(d.args) > 1:
            log["format"] = d.args[1]
        for extra in d.args[2:]:
            if extra.startswith(("buffer=", "flush=")):
                self.ignore(d, f"{extra}: fastws buffers log lines and writes them once a "
                            "second")
            else:
                raise fail(d, f"\"access_log\": {extra.split('=')[0]} is not supported by "
                           "fastws")
        return log

    def log_format(self, d: Directive) -> None:
        name, parts = d.args[0], d.args[1:]
        escape = "default"
        if parts and parts[0].startswith("escape="):
            escape = parts[0][7:]
            parts = parts[1:]
            if escape not in ("default", "json", "none"):
                raise fail(d, f"\"log_format\": unknown escape \"{escape}\" (default, json or "
                           "none)")
        if not parts:
            raise fail(d, "invalid number of arguments in \"log_format\" directive")
        formats = self.out.data.setdefault("log_format", {})
        if name in formats or name == "combined":
            raise fail(d, f"duplicate \"log_format\" name \"{name}\"")
        formats[name] = "".join(parts) if escape == "default" else \
            {"format": "".join(parts), "escape": escape}
        self.at(f"log_format.{name}", d)

    def map(self, d: Directive) -> None:
        src, dst = d.args
        if not dst.startswith("$"):
            raise fail(d, f"\"map\": invalid variable name \"{dst}\"")
        name = dst[1:].lower()
        entries: list[tuple[str, str]] = []
        table: dict[str, Any] = {"variable": name, "source": _template(d, src)}
        for e in d.block or ():
            literal = e.quoted[0] if e.quoted else False
            if e.block is not None:
                raise fail(e, "\"map\": each line is a value and its result")
            if e.name == "hostnames" and not literal and not e.args:
                table["hostnames"] = True
            elif e.name == "volatile" and not literal and not e.args:
                self.ignore(e, "fastws evaluates a map each time it is used")
            elif len(e.args) != 1:
                raise fail(e, "invalid number of arguments in \"map\" line (a value and its "
                           "result)")
            elif e.name == "default" and not literal:
                table["default"] = e.args[0]
            else:
                entries.append((e.name, e.args[0]))
        recipe = dict(entries)
        if src == "$http_upgrade" and set(recipe) == {""} and len(entries) == 1 and \
                table.get("default", "").lower() == "upgrade" and recipe[""] in ("close", ""):
            # the recipe's map, or its keep-alive form ('' ''): what fastws does itself
            self.maps[name] = d
            self.differ(d, f"map $http_upgrade ${name}: fastws tunnels only the upgrade "
                        "tokens a location allows (websocket by default); nginx sends "
                        "\"Connection: upgrade\" for any Upgrade value, h2c included",
                        once="map")
            if name == "connection_upgrade":
                return          # built in
        table["values"] = [[k, v] for k, v in entries]
        index = len(self.out.data.setdefault("map", []))
        self.out.data["map"].append(table)
        self.at(f"map[{index}]", d)
        self.at(f"map.{name}", d)

    # upstream
    def upstream(self, d: Directive) -> None:
        name = d.args[0]
        if name in self.upstreams:
            raise fail(d, f"duplicate upstream \"{name}\"")
        where = f"upstream.{name}"
        up: dict[str, Any] = {"name": name, "servers": []}
        self.at(where, d)
        for e in d.block or ():
            if self.check(e, UPSTREAM) == IGNORE:
                continue
            if e.name == "server":
                self.at(f"{where}.servers[{len(up['servers'])}]", e)
                up["servers"].append(self.upstream_server(e))
            elif e.name in ("ip_hash", "least_conn", "hash"):
                if "balance" in up:
                    raise fail(e, f"\"{e.name}\": the group already balances by "
                               f"{up['balance']}")
                up["balance"] = e.name
                if e.name == "hash":
                    up["hash_key"] = _template(e, e.args[0])
                    if len(e.args) == 2:
                        if e.args[1] != "consistent":
                            raise fail(e, f"\"hash\": invalid parameter \"{e.args[1]}\"")
                        up["consistent"] = True
                self.at(f"{where}.balance", e)
                self.at(f"{where}.hash_key", e)
                self.at(f"{where}.consistent", e)
            elif e.name == "sticky":
                up["sticky"] = self.sticky(e)
                self.at(f"{where}.sticky", e)
            elif e.name == "keepalive":
                up["keepalive"] = _int(e, e.args[0], 1)
                self.at(f"{where}.keepalive", e)
            elif e.name == "send_proxy_protocol":
                up["send_proxy_protocol"] = e.args[0]
                self.at(f"{where}.send_proxy_protocol", e)
            elif e.name == "keepalive_timeout":
                up["keepalive_timeout"] = _time(e, e.args[0])
                self.at(f"{where}.keepalive_timeout", e)
            elif e.name == "keepalive_requests":
                up["keepalive_requests"] = _int(e, e.args[0], 1)
                self.at(f"{where}.keepalive_requests", e)
        if not up["servers"]:
            raise fail(d, f"no servers are inside upstream \"{name}\"")
        self.upstreams[name] = up

    def limit_zone(self, d: Directive) -> None:
        """`limit_conn_zone KEY zone=NAME:SIZE`, `limit_req_zone KEY zone=NAME:SIZE rate=R`."""
        kind = d.name
        table: dict[str, Any] = {"key": _template(d, d.args[0])}
        for p in d.args[1:]:
            key, eq, value = p.partition("=")
            if key == "zone" and eq:
                name, colon, size = value.partition(":")
                if not name or not colon:
                    raise fail(d, f"\"{d.name}\": invalid zone \"{value}\" (NAME:SIZE)")
                table["name"] = name
                table["size"] = parse_size(_size(d, size))
            elif key == "rate" and eq and kind == "limit_req_zone":
                table["rate"] = value
            elif p == "sync":
                raise fail(d, f"\"{d.name}\": sync is NGINX Plus's; fastws's zones are shared "
                           "by the workers of one instance")
            else:
                raise fail(d, f"\"{d.name}\": invalid parameter \"{p}\"")
        if "name" not in table:
            raise fail(d, f"\"{d.name}\": no zone=NAME:SIZE")
        if kind == "limit_req_zone" and "rate" not in table:
            raise fail(d, "\"limit_req_zone\": no rate=")
        zones = self.out.data.setdefault(kind, [])
        where = f"{kind}[{len(zones)}]"
        zones.append(table)
        for key in ("", ".name", ".key", ".size", ".rate"):
            self.at(where + key, d)

    def limit_req(self, d: Directive) -> dict[str, Any]:
        """`limit_req zone=NAME [burst=N] [nodelay | delay=N]`."""
        out: dict[str, Any] = {}
        for p in d.args:
            key, eq, value = p.partition("=")
            if key == "zone" and eq:
                out["zone"] = value
            elif key in ("burst", "delay") and eq:
                out[key] = _int(d, value, 0)
            elif p == "nodelay":
                out["nodelay"] = True
            else:
                raise fail(d, f"\"limit_req\": invalid parameter \"{p}\"")
        if "zone" not in out:
            raise fail(d, "\"limit_req\": no zone=NAME")
        return out

    def sticky(self, d: Directive) -> dict[str, Any]:
        """nginx's `sticky cookie NAME [expires=] [domain=] [path=] [httponly] [secure]
        [samesite=]`; `sticky route` and `sticky learn` are not supported."""
        if d.args[0] != "cookie":
            raise fail(d, f"\"sticky {d.args[0]}\" is not supported by fastws: use \"sticky "
                       "cookie NAME\"")
        out: dict[str, Any] = {"cookie": d.args[1]}
        for p in d.args[2:]:
            key, eq, value = p.partition("=")
            if key == "expires" and value:
                # nginx's "max": the cookie's end in 2037; ten years here
                out["max_age"] = "3650d" if value == "max" else _time(d, value)
            elif key in ("domain", "path") and value:
                out[key] = value
            elif key == "samesite" and value:
                if value.startswith("$"):
                    raise fail(d, "\"sticky\": samesite with a variable is not supported by "
                               "fastws")
                out[key] = value
            elif p in ("httponly", "secure"):
                out[p] = True
            else:
                raise fail(d, f"\"sticky\": invalid parameter \"{p}\"")
        self.differ(d, "sticky cookie: fastws writes the lifetime as Max-Age (nginx also "
                    "writes Expires)", once="sticky")
        return out

    def upstream_server(self, d: Directive) -> dict[str, Any]:
        addr = d.args[0]
        if not addr.startswith("unix:") and not re.search(r"(:\d+|^\[.*\]:\d+)$", addr):
            addr += ":80"      # nginx's default port for a server of an upstream block
        entry: dict[str, Any] = {"address": addr}
        for p in d.args[1:]:
            key, _, value = p.partition("=")
            if key in ("weight", "max_fails", "max_conns") and value:
                entry[key] = _int(d, value, 1 if key == "weight" else 0)
            elif key == "fail_timeout" and value:
                entry[key] = _time(d, value)
            elif p in ("backup", "down", "resolve"):
                entry[p] = True
            elif key in ("service", "route", "slow_start", "drain"):
                raise fail(d, f"\"server\": {key} is not supported by fastws")
            else:
                raise fail(d, f"\"server\": invalid parameter \"{p}\"")
        return entry

    # server
    def server(self, d: Directive, http: dict[str, Any]) -> None:
        settings = dict(http)
        settings.pop("@own_log", None)
        listens: list[Listen] = []
        names: list[str] = []
        locations: list[Directive] = []
        server_return: Directive | None = None
        for e in d.block or ():
            if self.check(e, SERVER) == IGNORE:
                continue
            if e.name == "listen":
                listens.append(self.listen(e))
            elif e.name == "server_name":
                names.extend(self.server_names(e))
            elif e.name == "location":
                locations.append(e)
            elif e.name == "return":
                server_return = e
            elif e.name == "error_log":
                self.ignore(e, "fastws keeps one error log, the main one")
            else:
                self.setting(settings, e)
        if not listens:
            listens.append(("0.0.0.0:80", False, False, d, False))
        # one server block per kind of address: plain or TLS, with the PROXY protocol or not
        for tls in (False, True):
            for pp in (False, True):
                group = [x for x in listens if x[1] == tls and x[4] == pp]
                if group:
                    self.server_block(d, group, names, locations, server_return, settings, tls,
                                      pp)

    def listen(self, d: Directive) -> Listen:
        addr = d.args[0]
        if addr.startswith("unix:"):
            raise fail(d, "\"listen\": fastws listens on IP addresses, not unix sockets")
        if addr.startswith("*:"):
            addr = "0.0.0.0:" + addr[2:]
        elif addr == "*":
            addr = "0.0.0.0:80"
        elif not addr.isdigit() and not re.search(r":\d+$", addr):
            addr += ":80"
        ssl = default = pp = False
        for p in d.args[1:]:
            key = p.split("=", 1)[0]
            if p == "ssl":
                ssl = True
            elif p in ("default_server", "default"):
                default = True
            elif key in ("reuseport", "backlog", "deferred", "ipv6only", "so_keepalive",
                         "fastopen", "rcvbuf", "sndbuf", "bind", "accept_filter", "setfib"):
                self.ignore(d, _LISTEN_IGNORED.get(key, f"{key}: a socket option of nginx's"))
            elif key in ("http2", "quic"):
                raise fail(d, f"\"listen\": {key}: fastws speaks HTTP/1.1 (and WebSocket over "
                           "it)")
            elif p == "proxy_protocol":
                pp = True
            else:
                raise fail(d, f"\"listen\": invalid parameter \"{p}\"")
        return addr, ssl, default, d, pp

    def server_names(self, d: Directive) -> list[str]:
        out = []
        for name in d.args:
            if name in ("", "_"):
                continue       # nginx's "no name" and catch-all conventions
            if name.startswith("."):
                out += [name[1:], "*" + name]   # nginx: .example.com is both
            else:
                out.append(name)
        return out

    def server_block(self, d: Directive, listens: list[Listen],
                     names: list[str], locations: list[Directive],
                     server_return: Directive | None, settings: dict[str, Any],
                     tls: bool, pp: bool = False) -> None:
        servers = self.out.data["server"]
        where = f"server[{len(servers)}]"
        block: dict[str, Any] = {"listen": [x[0] for x in listens]}
        self.at(where, d)
        for i, x in enumerate(listens):
            self.at(f"{where}.listen[{i}]", x[3])
        if names:
            block["server_name"] = names
        if pp:
            block["proxy_protocol"] = True
            self.at(f"{where}.proxy_protocol", listens[0][3])
        if any(x[2] for x in listens):
            block["default"] = True
            self.at(f"{where}.default", next(x[3] for x in listens if x[2]))
        for name, key, conv in (("client_header_timeout", "client_header_timeout", _time),):
            if name in settings:
                block[key] = conv(settings[name], settings[name].args[0])
                self.at(f"{where}.{key}", settings[name])
        if "large_client_header_buffers" in settings:
            e = settings["large_client_header_buffers"]
            count = _int(e, e.args[0], 1)
            size = parse_size(_size(e, e.args[1]))
            block["max_request_line"] = size
            block["max_request_head"] = size * count
            self.at(f"{where}.max_request_line", e)
            self.at(f"{where}.max_request_head", e)
        if tls:
            block["tls"] = self.server_tls(d, settings, f"{where}.tls")
        trusted = settings.get("real_ip_from") or []
        header = settings.get("real_ip_header")
        if header is not None and header.args[0] == "proxy_protocol" and not pp:
            trusted = []      # nginx: no PROXY header on these listeners, so no address from it
        if trusted:
            real_ip: dict[str, Any] = {"from": [e.args[0] for e in trusted]}
            if header is not None:
                real_ip["header"] = header.args[0]
            recursive = settings.get("real_ip_recursive")
            if recursive is not None:
                real_ip["recursive"] = _flag(recursive)
            block["real_ip"] = real_ip
            self.at(f"{where}.real_ip", trusted[0])
            for i, e in enumerate(trusted):
                self.at(f"{where}.real_ip.from[{i}]", e)
        if "access_log" in settings and settings.get("@own_log") is settings:
            block["access_log"] = self.access_log(settings["access_log"])
            self.at(f"{where}.access_log", settings["access_log"])
        block["location"] = []
        servers.append(block)
        if server_return is not None:
            # nginx runs a server-level return before any location is chosen
            loc = Directive("location", ["/"], server_return.file, server_return.line, [])
            self.location(loc, block, where, settings, forced_return=server_return)
            if block["location"] or "redirect_https" in block:
                return
            raise fail(server_return, "\"return\": fastws's only redirect is to https")
        seen: set[str] = set()
        for loc in locations:
            self.location(loc, block, where, settings, seen=seen)
        if not block["location"] and "redirect_https" not in block:
            raise fail(d, "the server has no location: fastws needs a location with "
                       "proxy_pass, return or stub_status")

    def server_tls(self, d: Directive, settings: dict[str, Any], where: str) -> dict[str, Any]:
        cert, key = settings.get("ssl_certificate"), settings.get("ssl_certificate_key")
        if cert is None or key is None:
            raise fail(d, "no \"ssl_certificate\" and \"ssl_certificate_key\" are defined for "
                       "the \"listen ... ssl\" directive")
        for e in (cert, key):
            if "$" in e.args[0]:
                raise fail(e, f"\"{e.name}\": certificates named by variables are not "
                           "supported by fastws")
        out: dict[str, Any] = {"certificate": self.path(cert.args[0], conf=True),
                               "key": self.path(key.args[0], conf=True)}
        self.at(f"{where}.certificate", cert)
        self.at(f"{where}.key", key)
        self.at(where, cert)
        if "ssl_protocols" in settings:
            out["protocols"] = settings["ssl_protocols"].args
            self.at(f"{where}.protocols", settings["ssl_protocols"])
        else:
            self.differ(d, "ssl_protocols: fastws's default is TLSv1.2 TLSv1.3 (nginx 1.22's "
                        "adds TLSv1 and TLSv1.1)", once="ssl_protocols")
        if "ssl_ciphers" in settings:
            out["ciphers"] = settings["ssl_ciphers"].args[0]
            self.at(f"{where}.ciphers", settings["ssl_ciphers"])
        if "ssl_session_tickets" in settings:
            out["session_tickets"] = _flag(settings["ssl_session_tickets"])
        verify: Directive | None = settings.get("ssl_verify_client")
        if verify is not None:
            mode = verify.args[0]
            if mode == "optional_no_ca":
                raise fail(verify, "\"ssl_verify_client optional_no_ca\": fastws checks every "
                           "client certificate it asks for (use optional)")
            if mode not in ("on", "off", "optional"):
                raise fail(verify, f"\"ssl_verify_client\": invalid value \"{mode}\"")
            out["verify_client"] = mode
            self.at(f"{where}.verify_client", verify)
            if mode == "on":
                self.differ(verify, "ssl_verify_client on: a client without a certificate "
                            "fails the TLS handshake (nginx answers it 400)",
                            once="ssl_verify_client")
        ca: Directive | None = settings.get("ssl_client_certificate")
        if ca is not None:
            out["client_ca"] = self.path(ca.args[0], conf=True)
            self.at(f"{where}.client_ca", ca)
        return out

    # location
    def frames(self, loc: dict[str, Any], where: str, settings: dict[str, Any]) -> None:
        # fastws's own directives for WebSocket frames (docs/websocket.md)
        self.keys(loc, where, settings, (
            ("websocket_frames", "frames", _flag),
            ("websocket_frame_checks", "frame_checks", _flag),
            ("websocket_max_message_size", "max_message_size", lambda d: _size(d, d.args[0])),
            ("websocket_close_timeout", "close_timeout", lambda d: _time(d, d.args[0]))))
        ping: Directive | None = settings.get("websocket_ping")
        if loc.get("frames") is False:
            # a blind location does not see messages: what it inherits about them is moot
            loc.pop("max_message_size", None)
            ping = None
        if ping is not None:
            # websocket_ping INTERVAL [TIMEOUT] [client|upstream|both]
            args = list(ping.args)
            if len(args) > 1 and args[-1] in ("client", "upstream", "both"):
                loc["ping_to"] = args.pop()
            loc["ping_interval"] = _time(ping, args[0])
            if len(args) == 2:
                loc["ping_timeout"] = _time(ping, args[1])
            elif len(args) > 2:
                raise fail(ping, "expected INTERVAL [TIMEOUT] [client|upstream|both]")
            for key in ("ping_interval", "ping_timeout", "ping_to"):
                self.at(f"{where}.{key}", ping)

    def hooks(self, loc: dict[str, Any], where: str, settings: dict[str, Any]) -> None:
        # fastws's own directives for Python hooks (docs/extending.md); "off" for none
        self.keys(loc, where, settings, (
            ("fastws_hook", "hook", _callable),
            ("fastws_on_tunnel_close", "on_tunnel_close", _callable),
            ("fastws_hook_requests", "hook_requests", _flag),
            ("fastws_hook_timeout", "hook_timeout", lambda d: _time(d, d.args[0]))))

    def keys(self, loc: dict[str, Any], where: str, settings: dict[str, Any],
             table: tuple[tuple[str, str, Any], ...]) -> None:
        # one-argument directives, each the TOML key it stands for (its place recorded)
        for name, key, read in table:
            d: Directive | None = settings.get(name)
            if d is not None:
                loc[key] = read(d)
                self.at(f"{where}.{key}", d)

    def location(self, d: Directive, server: dict[str, Any], server_where: str,
                 inherited: dict[str, Any], *, forced_return: Directive | None = None,
                 seen: set[str] | None = None) -> None:
        args = list(d.args)
        if len(args) == 1:
            for mod in ("^~", "=", "~*", "~"):
                if args[0].startswith(mod) and len(args[0]) > len(mod):
                    args = [mod, args[0][len(mod):]]
                    break
        if len(args) == 2:
            mod, uri = args
            if mod not in ("=", "^~", "~", "~*"):
                raise fail(d, f"invalid location modifier \"{mod}\"")
        else:
            mod, uri = "", args[0]
        if uri.startswith("@"):
            raise fail(d, f"\"location {uri}\": named locations are not supported by fastws "
                       "(it has no internal redirects)")
        if not uri.startswith("/") and mod not in ("~", "~*"):
            raise fail(d, f"\"location {uri}\": fastws's locations start with \"/\"")
        path = f"{mod} {uri}" if mod else uri
        if seen is not None:
            if path in seen:
                raise fail(d, f"duplicate location \"{uri}\"")
            seen.add(path)
        where = f"{server_where}.location[{path!r}]"
        settings = dict(inherited)
        settings.pop("@own_log", None)
        handler: Directive | None = forced_return
        for e in d.block or ():
            if self.check(e, LOCATION) == IGNORE:
                continue
            if e.name == "location":
                raise fail(e, "nested locations are not supported by fastws: write them at "
                           "the server's level")
            if e.name in ("proxy_pass", "return", "stub_status"):
                if handler is not None:
                    raise fail(e, f"\"{e.name}\": the location already has "
                               f"\"{handler.name}\"")
                handler = e
            elif e.name == "error_log":
                self.ignore(e, "fastws keeps one error log, the main one")
            else:
                self.setting(settings, e)
        if handler is None:
            raise fail(d, f"\"location {uri}\": fastws is a proxy and serves no files: give "
                       "the location a proxy_pass, return or stub_status")
        loc: dict[str, Any] = {"path": path}
        self.at(where, d)
        self.at(f"{where}.path", d)
        if handler.name == "proxy_pass":
            self.proxy(loc, where, handler, settings)
        elif handler.name == "return":
            self.return_(loc, where, handler, server)
            if any(settings.get(k) for k in ("access", "limit_conn", "limit_req")):
                self.differ(handler, "return with allow/deny or limits: fastws applies the rules "
                            "and limits first (nginx answers a return before them)",
                            once="return-rules")
        elif not handler.args or _flag(handler):
            loc["stub_status"] = True
            self.at(f"{where}.stub_status", handler)
        else:
            raise fail(d, f"\"location {uri}\": fastws is a proxy and serves no files: give "
                       "the location a proxy_pass, return or stub_status")
        self.limits(loc, where, settings)
        origins: Directive | None = settings.get("websocket_origins")
        if origins is not None:
            loc["origins"] = list(origins.args)
            self.at(f"{where}.origins", origins)
            for i in range(len(origins.args)):
                self.at(f"{where}.origins[{i}]", origins)
        missing: Directive | None = settings.get("websocket_origin_missing")
        if missing is not None:
            loc["origin_missing"] = missing.args[0]
            self.at(f"{where}.origin_missing", missing)
        fwd: Directive | None = settings.get("forwarded_headers")
        if fwd is not None:
            loc["forwarded_headers"] = fwd.args[0]
            self.at(f"{where}.forwarded_headers", fwd)
        idle: Directive | None = settings.get("websocket_idle_timeout")
        if idle is not None:
            loc["idle_timeout"] = _time(idle, idle.args[0])
            self.at(f"{where}.idle_timeout", idle)
        life: Directive | None = settings.get("websocket_max_lifetime")
        if life is not None:
            # websocket_max_lifetime TIME [SPREAD]
            loc["max_tunnel_lifetime"] = _time(life, life.args[0])
            if len(life.args) == 2:
                loc["lifetime_spread"] = _time(life, life.args[1])
            for key in ("max_tunnel_lifetime", "lifetime_spread"):
                self.at(f"{where}.{key}", life)
        self.frames(loc, where, settings)
        self.hooks(loc, where, settings)
        for e in settings.get("limit_conn") or []:
            loc.setdefault("limit_conn", []).append({"zone": e.args[0],
                                                     "max": _int(e, e.args[1], 1)})
            self.at(f"{where}.limit_conn[{len(loc['limit_conn']) - 1}]", e)
            self.at(f"{where}.limit_conn[{len(loc['limit_conn']) - 1}].zone", e)
        for e in settings.get("limit_req") or []:
            loc.setdefault("limit_req", []).append(self.limit_req(e))
            self.at(f"{where}.limit_req[{len(loc['limit_req']) - 1}]", e)
            self.at(f"{where}.limit_req[{len(loc['limit_req']) - 1}].zone", e)
        for name in ("limit_conn_status", "limit_req_status"):
            if name in settings:
                loc[name] = _int(settings[name], settings[name].args[0], 400)
                self.at(f"{where}.{name}", settings[name])
        rules = settings.get("access") or []
        if rules:
            loc["access"] = [f"{e.name} {e.args[0]}" for e in rules]
            self.at(f"{where}.access", rules[0])
            for i, e in enumerate(rules):
                self.at(f"{where}.access[{i}]", e)
        if "access_log" in settings and settings.get("@own_log") is settings:
            loc["access_log"] = self.access_log(settings["access_log"])
            self.at(f"{where}.access_log", settings["access_log"])
        if "redirect_https" not in loc:
            # config.py names a location by its index too, before it knows its path
            index = f"{server_where}.location[{len(server['location'])}]"
            for key, e in list(self.out.positions.items()):
                if key == where or key.startswith(where + "."):
                    self.at(index + key[len(where):], e)
            server["location"].append(loc)

    def limits(self, loc: dict[str, Any], where: str, settings: dict[str, Any]) -> None:
        for name, conv in (("keepalive_timeout", _time), ("client_body_timeout", _time),
                           ("client_max_body_size", _size)):
            e = settings.get(name)
            if e is not None:
                loc[name] = conv(e, e.args[0])
                self.at(f"{where}.{name}", e)
                if name == "keepalive_timeout" and len(e.args) > 1:
                    self.ignore(e, "its second argument: fastws sends no Keep-Alive header")
        e = settings.get("keepalive_requests")
        if e is not None:
            loc["keepalive_requests"] = _int(e, e.args[0], 1)
            self.at(f"{where}.keepalive_requests", e)

    def return_(self, loc: dict[str, Any], where: str, d: Directive,
                server: dict[str, Any]) -> None:
        if len(d.args) == 1 and not d.args[0].isdigit():
            raise fail(d, "\"return URL\": fastws's return answers a status and a text; a "
                       "redirect to https is redirect_https")
        code = _int(d, d.args[0], 0)
        text = d.args[1] if len(d.args) == 2 else ""
        if code in (301, 302, 303, 307, 308):
            if text in ("https://$host$request_uri", "https://$server_name$request_uri",
                        "https://$http_host$request_uri") and loc["path"] == "/":
                server["redirect_https"] = 443
                if code != 301:
                    self.differ(d, f"return {code}: fastws redirects to https with 301")
                loc["redirect_https"] = True
                self.at(f"{where.rsplit('.location', 1)[0]}.redirect_https", d)
                return
            raise fail(d, f"\"return {code}\": fastws's only redirect is to https "
                       "(return 301 https://$host$request_uri in location /)")
        if "$" in text:
            raise fail(d, "\"return\": fastws's answer text cannot hold variables")
        loc["return"] = [code, text] if text else code
        self.at(f"{where}.return", d)

    def proxy(self, loc: dict[str, Any], where: str, d: Directive,
              settings: dict[str, Any]) -> None:
        url = d.args[0]
        if "$" in url and not url.startswith("http://"):
            raise fail(d, "\"proxy_pass\" with variables: fastws takes \"http://NAME[/uri]\", "
                       "NAME an upstream block")
        if url.startswith("unix:") or "://unix:" in url:
            raise fail(d, "\"proxy_pass\": fastws connects to upstreams over TCP, not unix "
                       "sockets")
        if not url.startswith(("http://", "https://")):
            raise fail(d, f"\"proxy_pass\": invalid URL prefix in \"{url}\"")
        loc["proxy_pass"] = url
        self.at(f"{where}.proxy_pass", d)
        if "$" not in url:
            self.at(f"proxy_pass {url.split('/', 3)[0]}//{url.split('/', 3)[2]}", d)
        e = settings.get("proxy_http_version")
        if e is None or e.args[0] != "1.1":
            if e is not None and e.args[0] != "1.0":
                raise fail(e, f"\"proxy_http_version\": invalid value \"{e.args[0]}\"")
            self.differ(e or d, "proxy_http_version 1.0 (nginx's default): fastws speaks "
                        "HTTP/1.1 to upstreams, with keep-alive where the group has one",
                        once="http_version")
        for name, key in (("proxy_connect_timeout", "connect_timeout"),
                          ("proxy_send_timeout", "send_timeout"),
                          ("proxy_read_timeout", "read_timeout"),
                          ("proxy_next_upstream_timeout", "next_upstream_timeout")):
            e = settings.get(name)
            if e is not None:
                loc[key] = _time(e, e.args[0])
                self.at(f"{where}.{key}", e)
        e = settings.get("proxy_next_upstream_tries")
        if e is not None:
            loc["next_upstream_tries"] = _int(e, e.args[0], 0)
            self.at(f"{where}.next_upstream_tries", e)
        e = settings.get("proxy_next_upstream")
        if e is not None:
            self.next_upstream(loc, where, e)
        e = settings.get("proxy_socket_keepalive")
        if e is not None and _flag(e):
            loc["socket_keepalive"] = True
            self.at(f"{where}.socket_keepalive", e)
        e = settings.get("proxy_redirect")
        if e is not None and e.args != ["off"] and e.args != ["default"]:
            raise fail(e, "\"proxy_redirect\": fastws relays Location headers as the upstream "
                       "sent them (proxy_redirect off)")
        fwd = settings.get("forwarded_headers")
        self.headers(loc, where, d, settings.get("proxy_set_header", []),
                     replace=fwd is not None and fwd.args[0] == "replace")
        self.upstream_tls(d, url, settings)

    def next_upstream(self, loc: dict[str, Any], where: str, e: Directive) -> None:
        conds = set(e.args)
        if conds == {"off"}:
            loc["next_upstream_tries"] = 1
        elif not conds <= {"error", "timeout", "invalid_header", "non_idempotent"}:
            other = sorted(conds - {"error", "timeout", "invalid_header", "non_idempotent"})
            raise fail(e, f"\"proxy_next_upstream\": fastws tries the next server on error "
                       f"and timeout only, not on {other[0]}")
        elif conds & {"error", "timeout"} != {"error", "timeout"}:
            raise fail(e, "\"proxy_next_upstream\": fastws tries the next server on both "
                       "error and timeout (or off)")
        self.at(f"{where}.next_upstream_tries", e)

    def headers(self, loc: dict[str, Any], where: str, d: Directive,
                lines: list[Directive], *, replace: bool = False) -> None:
        """nginx sends Host: $proxy_host and the client's own X-Real-IP / X-Forwarded-* (none of
        its own) unless told otherwise; fastws's defaults add them, so the table says what
        nginx would send."""
        out: dict[str, str] = {}
        positions: dict[str, Directive] = {}
        for e in lines:
            name, value = e.args
            low = name.lower()
            if low == "upgrade":
                if value != "$http_upgrade":
                    self.differ(e, f"proxy_set_header Upgrade {value}: fastws passes the "
                                "client's Upgrade token on a tunnel, and none on other "
                                "requests", once="upgrade")
                continue
            if low == "connection":
                if value.startswith("$") and value[1:].lower() not in self.maps:
                    _template(e, value)         # an unknown variable is still an error
                if value[1:].lower() not in self.maps and value.lower() not in ("upgrade", ""):
                    self.differ(e, f"proxy_set_header Connection {value}: fastws sets "
                                "Connection itself (upgrade on a tunnel, keep-alive to a "
                                "group with keepalive)", once="connection")
                continue
            if any(low == k.lower() for k in out):
                raise fail(e, f"\"proxy_set_header\": {name} is set twice (fastws sends one)")
            out[name] = _template(e, value)
            positions[name] = e
        if not any(k.lower() == "host" for k in out):
            out["Host"] = "$proxy_host"
        for name in _FORWARDED:
            if not any(k.lower() == name.lower() for k in out):
                # nginx passes the client's own value on (and nothing when there is none);
                # with forwarded_headers replace, fastws's own values are sent instead
                out[name] = _OWN_FORWARDED[name] if replace else \
                    "$http_" + name.lower().replace("-", "_")
        loc["set_headers"] = out
        self.at(f"{where}.set_headers", lines[0] if lines else d)
        for name, e in positions.items():
            self.at(f"{where}.set_headers.{name}", e)

    def upstream_tls(self, d: Directive, url: str, settings: dict[str, Any]) -> None:
        verify = settings.get("proxy_ssl_verify")
        trusted = settings.get("proxy_ssl_trusted_certificate")
        sni = settings.get("proxy_ssl_server_name")
        sni_name = settings.get("proxy_ssl_name")
        if not url.startswith("https://"):
            return
        name = url[8:].split("/", 1)[0]
        tls: dict[str, Any] = {}
        if verify is not None:
            tls["verify"] = _flag(verify)
        else:
            self.differ(d, "proxy_ssl_verify off (nginx's default): fastws verifies the "
                        "upstream's certificate unless told \"proxy_ssl_verify off\"",
                        once="ssl_verify")
        if trusted is not None:
            tls["ca_file"] = self.path(trusted.args[0], conf=True)
        if sni_name is not None and sni is not None and _flag(sni):
            tls["server_name"] = sni_name.args[0]
        if sni is None or not _flag(sni):
            self.differ(d, "proxy_ssl_server_name off (nginx's default): fastws sends the "
                        "upstream's name in SNI", once="ssl_sni")
        if not tls:
            return
        up = self.upstreams.get(name)
        if up is None:
            raise fail(d, "\"proxy_ssl_*\" with an https:// address: name the server in an "
                       "upstream block so that its TLS settings have a place")
        if "tls" in up and up["tls"] != tls:
            raise fail(d, f"\"proxy_ssl_*\": upstream \"{name}\" is used with other TLS "
                       "settings elsewhere")
        up["tls"] = tls
        self.at(f"upstream.{name}.tls", verify or trusted or sni or d)


def translate(tree: Tree, prefix: str) -> Translation:
    conf_prefix = os.path.dirname(os.path.abspath(tree.files[0]))
    # the maps' variables may be used before their block, as in nginx
    names = {d.args[1][1:].lower(): i for i, d in enumerate(
        d for top in tree.body for d in [top, *(top.block or ())]
        if d.name == "map" and len(d.args) == 2 and d.args[1].startswith("$"))}
    with variables.maps_known(names):
        return _Translator(tree, prefix, conf_prefix).run()
