"""The nginx WebSocket recipe's blocks (tests/data/nginx-websocket.conf), each made into a whole
nginx.conf with test addresses, and a real nginx to run such a file.

Each block is taken from the reference file as written; only its addresses and file paths are
swapped for test ones, and the directives a block needs around it (the main context, `http`, a
`server` around a bare `location`, the upstreams and map it names) are added around it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support import wait_port

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "nginx-websocket.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                  else None)

RECIPE_MAP = """map $http_upgrade $connection_upgrade {
        default upgrade;
        ''      close;
    }"""


def reference_blocks() -> dict[str, str]:
    """The reference file's blocks by title ("Basic configuration", ...), as written."""
    blocks: dict[str, str] = {}
    title = None
    lines: list[str] = []
    for line in REFERENCE.read_text().splitlines():
        m = re.match(r"# --- (.+?) -+$", line)
        if m:
            if title is not None:
                blocks[title] = "\n".join(lines).strip() + "\n"
            title, lines = m.group(1), []
        elif title is not None:
            lines.append(line)
    if title is not None:
        blocks[title] = "\n".join(lines).strip() + "\n"
    return blocks


def statements(text: str) -> list[tuple[str, str]]:
    """The top-level statements of a block's text: (first word, text), comments kept with the
    statement that follows them."""
    out: list[tuple[str, str]] = []
    depth, start, i = 0, 0, 0
    quote = ""
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            i = text.find("\n", i)
            if i < 0:
                break
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                out.append(_statement(text[start:i + 1]))
                start = i + 1
        elif ch == ";" and depth == 0:
            out.append(_statement(text[start:i + 1]))
            start = i + 1
        i += 1
    return out


def _statement(text: str) -> tuple[str, str]:
    words = [w for line in text.splitlines() if not line.strip().startswith("#")
             for w in line.split()]
    return words[0], text.strip("\n")


@dataclass
class Site:
    """Test addresses for one rendering."""

    tmp: Path
    port: int            # `listen 80`
    tls_port: int        # `listen 443 ssl`
    backends: list[str]  # 192.168.1.100:8080, .101, .102 -> these
    other: str           # `backend`, chat_backend, notification_backend -> this
    cert: str = ""
    key: str = ""


def swap(text: str, site: Site) -> str:
    """Swap the guide's addresses and paths for the test's."""
    for i, addr in enumerate(site.backends):
        text = text.replace(f"192.168.1.{100 + i}:8080", addr)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{site.port};")
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{site.tls_port} ssl;")
    text = text.replace("/etc/nginx/ssl/example.com.crt", site.cert)
    text = text.replace("/etc/nginx/ssl/example.com.key", site.key)
    text = text.replace("/var/log/nginx/websocket_access.log",
                        str(site.tmp / "websocket_access.log"))
    # the complete example names `backend` without defining it in its own http block
    text = text.replace("proxy_pass http://backend;", f"proxy_pass http://{site.other};")
    return text


WS_LOCATION = """    location /ws {
        proxy_pass http://websocket_backend;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
    }"""


def render(title: str, site: Site, *, extra_main: str = "") -> str:
    """A whole nginx.conf around one reference block."""
    parts = statements(swap(reference_blocks()[title], site))
    words = [word for word, _ in parts]
    head = [f"daemon off;\npid {site.tmp}/nginx.pid;\nerror_log {site.tmp}/error.log info;",
            extra_main]
    if "events" not in words:
        head.append("events {\n    worker_connections 1024;\n}")
    head += [text for word, text in parts if word == "events"]
    if "http" in words:
        return "\n".join(head + [text for word, text in parts if word == "http"]) + "\n"
    http = [text for word, text in parts if word not in ("events", "location")]
    locations = [text for word, text in parts if word == "location"]
    if "server" not in words:
        if not any(re.match(r"(#.*\n\s*)*location /ws ", t) for t in locations):
            locations.append(WS_LOCATION)
        http.append(f"server {{\n    listen 127.0.0.1:{site.port};\n"
                    "    server_name example.com;\n" + "\n".join(locations) + "\n}")
    text = "\n".join(http)
    defined = set(re.findall(r"upstream\s+(\w+)", text))
    around = []
    if "access_log" not in words:
        around.append(f"access_log {site.tmp}/access.log;")
    if "map" not in words:
        around.append(RECIPE_MAP)
    for name in sorted(set(re.findall(r"proxy_pass http://(\w+);", text)) - defined):
        servers = site.backends if name == "websocket_backend" else [site.other]
        around.append(f"upstream {name} {{\n"
                      + "".join(f"        server {s};\n" for s in servers) + "    }")
    return "\n".join(head + ["http {"] + around + http + ["}"]) + "\n"


class Nginx:
    """Debian's nginx, in the foreground, on a configuration file, with `-p` as its prefix."""

    def __init__(self, conf: Path, prefix: Path, port: int) -> None:
        assert NGINX is not None, "nginx is not installed: apt-get install nginx-light"
        self.log = open(prefix / "nginx-stderr.log", "wb")
        self.proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_port("127.0.0.1", port)
        except TimeoutError:
            self.stop()
            raise RuntimeError((prefix / "nginx-stderr.log").read_text()) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
