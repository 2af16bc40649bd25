"""Choosing a server block and a location for a request, with nginx's rules.

Server: among the blocks listening on the address the connection came in on, the one whose
server_name matches the Host (exact names first, then the longest leading wildcard "*.example.com",
then the longest trailing wildcard "www.example.*"), else the default server of that address (the
one marked `default`, or the first).  Location: an exact `= /path` match first, then the longest
matching prefix (ngx_http_core_find_location without regular expressions).
"""

from __future__ import annotations

from .config import Address, Config, LocationConfig, ServerBlock


class _Names:
    __slots__ = ("exact", "head", "tail", "default")

    def __init__(self, servers: list[ServerBlock]) -> None:
        self.exact: dict[str, ServerBlock] = {}
        self.head: list[tuple[str, ServerBlock]] = []   # "*.example.com" -> ".example.com"
        self.tail: list[tuple[str, ServerBlock]] = []   # "www.example.*" -> "www.example."
        for server in servers:
            for name in server.server_name:
                if name.startswith("*."):
                    self.head.append((name[1:], server))
                elif name.startswith("."):                # ".example.com": both forms
                    self.exact.setdefault(name[1:], server)
                    self.head.append((name, server))
                elif name.endswith(".*"):
                    self.tail.append((name[:-1], server))
                else:
                    self.exact.setdefault(name, server)
        self.head.sort(key=lambda item: -len(item[0]))
        self.tail.sort(key=lambda item: -len(item[0]))
        self.default = next((s for s in servers if s.default), servers[0])

    def find(self, host: str) -> ServerBlock:
        server = self.exact.get(host)
        if server is not None:
            return server
        for suffix, server in self.head:
            if host.endswith(suffix):
                return server
        for prefix, server in self.tail:
            if host.startswith(prefix):
                return server
        return self.default


class _Locations:
    __slots__ = ("exact", "prefixes")

    def __init__(self, server: ServerBlock) -> None:
        self.exact = {loc.path: loc for loc in server.locations if loc.exact}
        self.prefixes = sorted((loc for loc in server.locations if not loc.exact),
                               key=lambda loc: -len(loc.path))

    def find(self, path: str) -> LocationConfig | None:
        loc = self.exact.get(path)
        if loc is not None:
            return loc
        for loc in self.prefixes:
            if path.startswith(loc.path):
                return loc
        return None


class Router:
    def __init__(self, config: Config) -> None:
        by_addr: dict[tuple[str, int], list[ServerBlock]] = {}
        self.addresses: dict[tuple[str, int], Address] = {}
        for server in config.servers:
            for addr in server.listen:
                key = (addr.host, addr.port)
                by_addr.setdefault(key, []).append(server)
                self.addresses.setdefault(key, addr)
        self._names = {key: _Names(servers) for key, servers in by_addr.items()}
        self._locations = {id(s): _Locations(s) for s in config.servers}

    def server(self, listen: tuple[str, int], host: str) -> ServerBlock:
        return self._names[listen].find(host)

    def location(self, server: ServerBlock, path: str) -> LocationConfig | None:
        return self._locations[id(server)].find(path)


def host_name(value: bytes | None) -> str:
    """nginx's $host from a Host header: lower case, without the port and a trailing dot."""
    if not value:
        return ""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end > 0 else host
    host = host.rsplit(":", 1)[0] if ":" in host else host
    return host.rstrip(".")
