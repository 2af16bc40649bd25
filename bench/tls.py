"""What TLS costs the proxy: wss echo and bulk through fastws and nginx with the same certificate.

    python -m bench.tls [--conns 50] [--messages 1000] [--size 64] [--bulk-mb 256]

Runs, one after the other in one process, fastws and nginx (one worker each) in front of the
bench's C WebSocket backend (bench/wsbackend.c, compiled into a temporary directory), each with
TLS and without, and prints the proxy's CPU time (utime + stime of all its processes and
threads, from /proc) per echoed message and per MB relayed.  A message is one client frame and
its echo: two passes through the proxy, one decrypting and one encrypting.  The client is
Python (threads, blocking ssl sockets, hand-built frames with a zero mask), so wall time says
little; the CPU the proxy spends for a fixed amount of work is the figure.  Loopback only; every
loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its child processes that are alive (nginx's workers)."""
    total = 0
    for p in [pid] + children(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def frame(payload: bytes, opcode: int = 2) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload     # a zero mask: the payload goes as it is


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def open_ws(port: int, path: str, ctx: ssl.SSLContext | None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is not None:
        s = ctx.wrap_socket(s, server_hostname="localhost")
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
              "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("no 101")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.decode(errors="replace"))
    return s


def close_ws(s: socket.socket) -> None:
    try:
        s.sendall(frame(b"\x03\xe8", opcode=8))
        s.settimeout(10)
        while s.recv(65536):
            pass
    except OSError:
        pass
    s.close()


def echo(port: int, ctx: ssl.SSLContext | None, conns: int, messages: int, size: int,
         pid: int) -> dict[str, float]:
    socks = [open_ws(port, "/echo", ctx) for _ in range(conns)]
    payload = os.urandom(size)
    out, expect = frame(payload), len(payload) + (2 if size < 126 else 4)
    errors: list[BaseException] = []

    def run(s: socket.socket) -> None:
        try:
            for _ in range(messages):
                s.sendall(out)
                if recv_exact(s, expect)[-size:] != payload:
                    raise ValueError("echo mismatch")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in socks]
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - t0
    for s in socks:
        close_ws(s)
    if errors:
        raise RuntimeError(f"echo failed: {errors[0]!r}")
    n = conns * messages
    return {"messages": n, "cpu_s": cpu, "us_per_msg": cpu / n * 1e6, "msg_per_s": n / wall}


def bulk_up(port: int, ctx: ssl.SSLContext | None, megabytes: int, pid: int) -> dict[str, float]:
    s = open_ws(port, "/sink", ctx)
    chunk = frame(os.urandom(65536))
    count = megabytes * 16
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    for _ in range(count):
        s.sendall(chunk)
    close_ws(s)            # the close comes back after every byte before it went through
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - t0
    return {"mb": megabytes, "cpu_s": cpu, "ms_per_mb": cpu / megabytes * 1e3,
            "mb_per_s": megabytes / wall}


def bulk_down(port: int, ctx: ssl.SSLContext | None, megabytes: int, pid: int) -> dict[str, float]:
    s = open_ws(port, "/firehose", ctx)
    want, got = megabytes << 20, 0
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    while got < want:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("firehose closed")
        got += len(chunk)
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - t0
    s.close()
    return {"mb": megabytes, "cpu_s": cpu, "ms_per_mb": cpu / megabytes * 1e3,
            "mb_per_s": megabytes / wall}


def rss_kb(pid: int) -> int:
    """Resident memory of a process and of its live child processes, in KiB."""
    total = 0
    for p in [pid] + children(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def idle(port: int, ctx: ssl.SSLContext | None, count: int, pid: int) -> dict[str, float]:
    """Memory the proxy holds per idle tunnel: open `count` tunnels, then compare RSS."""
    before = rss_kb(pid)
    socks = [open_ws(port, "/echo", ctx) for _ in range(count)]
    time.sleep(0.5)
    after = rss_kb(pid)
    for s in socks:
        s.close()
    return {"tunnels": count, "kb_per_tunnel": (after - before) / count}


def fastws_config(port: int, backend: int, cert: Path | None, key: Path | None) -> str:
    tls = f'tls = {{ certificate = "{cert}", key = "{key}" }}\n' if cert else ""
    return (f'[[upstream]]\nname = "backend"\nservers = ["127.0.0.1:{backend}"]\n\n'
            f'[[server]]\nlisten = ["127.0.0.1:{port}"]\n{tls}\n'
            '[[server.location]]\npath = "/"\nproxy_pass = "backend"\nread_timeout = "1h"\n'
            'send_timeout = "1h"\n')


def nginx_config(work: Path, port: int, backend: int, cert: Path | None, key: Path | None) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    ssl_lines = (f"ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
                 "        ssl_protocols TLSv1.2 TLSv1.3;\n" if cert else "")
    return f"""{user}worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/cb; proxy_temp_path {work}/px; fastcgi_temp_path {work}/fc;
    uwsgi_temp_path {work}/uw; scgi_temp_path {work}/sc;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port}{' ssl' if cert else ''};
        {ssl_lines}
        location / {{
            proxy_pass http://127.0.0.1:{backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--messages", type=int, default=1000, help="per connection")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--bulk-mb", type=int, default=256)
    ap.add_argument("--idle", type=int, default=1000, help="idle tunnels for the memory figure")
    ap.add_argument("--targets", default="fastws,nginx")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.idle + 1024)), hard))
    import trustme

    work = Path(tempfile.mkdtemp(prefix="fastws-bench-tls-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert, key = work / "site.crt", work / "site.key"
        cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)

        exe = work / "wsbackend"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "wsbackend.c")],
                       check=True)
        bport = free_port()
        procs.append(subprocess.Popen([str(exe), "-p", str(bport), "-t", "3600"],
                                      stdout=subprocess.DEVNULL))
        wait_port(bport)
        rows = []
        for target in args.targets.split(","):
            for tls in (True, False):
                port = free_port()
                c, k = (cert, key) if tls else (None, None)
                if target == "fastws":
                    conf = work / f"fastws-{port}.toml"
                    conf.write_text(fastws_config(port, bport, c, k))
                    cmd = [sys.executable, "-m", "fastws", "-c", str(conf), "--log-level", "error"]
                else:
                    conf = work / f"nginx-{port}.conf"
                    conf.write_text(nginx_config(work, port, bport, c, k))
                    cmd = [shutil.which("nginx") or "nginx", "-e", str(work / "nginx-error.log"),
                           "-p", str(work), "-c", str(conf)]
                proc = subprocess.Popen(cmd, cwd=ROOT)
                procs.append(proc)
                wait_port(port)
                ctx = client_ctx if tls else None
                row = {"target": target, "tls": tls,
                       "echo": echo(port, ctx, args.conns, args.messages, args.size, proc.pid),
                       "up": bulk_up(port, ctx, args.bulk_mb, proc.pid),
                       "down": bulk_down(port, ctx, args.bulk_mb, proc.pid),
                       "idle": idle(port, ctx, args.idle, proc.pid)}
                rows.append(row)
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
                procs.remove(proc)
        print(f"echo: {args.conns} connections x {args.messages} messages of {args.size} bytes; "
              f"bulk: {args.bulk_mb} MB up (to /sink) and down (from /firehose)")
        print("| proxy | TLS | echo CPU us/msg | echo msg/s | up CPU ms/MB | up MB/s "
              "| down CPU ms/MB | down MB/s | idle KiB/tunnel |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            e, u, d, i = r["echo"], r["up"], r["down"], r["idle"]
            print(f"| {r['target']} | {'wss' if r['tls'] else 'ws'} | {e['us_per_msg']:.1f} | "
                  f"{e['msg_per_s']:.0f} | {u['ms_per_mb']:.2f} | {u['mb_per_s']:.0f} | "
                  f"{d['ms_per_mb']:.2f} | {d['mb_per_s']:.0f} | {i['kb_per_tunnel']:.1f} |")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
