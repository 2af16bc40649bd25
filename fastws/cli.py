"""The fastws command: run, check a configuration, or try the demo."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastws",
        description="A WebSocket-aware HTTP/1.1 reverse proxy with a compiled engine.")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="configuration file: TOML, or nginx's format (nginx.conf)")
    p.add_argument("--format", choices=("toml", "nginx"),
                   help="the configuration's format (default: by its name, else its content)")
    p.add_argument("-p", "--prefix", metavar="DIR",
                   help="nginx's prefix: relative log and pid paths of an nginx configuration "
                   "are under it (default: the configuration file's directory)")
    p.add_argument("-t", "--test", action="store_true",
                   help="check the configuration, print its upstreams, and exit")
    p.add_argument("-T", dest="dump", action="store_true",
                   help="check the configuration, print it (every file read, then as fastws "
                   "runs it, in TOML) and exit")
    p.add_argument("-s", dest="signal", choices=("reload", "quit", "stop", "reopen", "drain"),
                   help="send a signal to the master process (through the pid file); drain "
                   "(with drain_on_term) waits until it has drained and exited")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warn", "error"), help="error log level")
    p.add_argument("-V", "--version", action="version", version=f"fastws {__version__}")
    sub = p.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run a WebSocket echo backend with fastws in front of it")
    demo.add_argument("--port", type=int, default=8080, help="the proxy's port (default 8080)")
    client = sub.add_parser("client", help="send messages to a WebSocket URL and print the answers")
    client.add_argument("url", help="ws:// URL")
    client.add_argument("messages", nargs="*", default=["hello"], help="text messages to send")
    convert = sub.add_parser("convert", help="print an nginx configuration as fastws's TOML")
    convert.add_argument("file", help="nginx configuration file")
    convert.add_argument("-p", "--prefix", dest="convert_prefix", metavar="DIR",
                         help="nginx's prefix for relative paths (default: the file's directory)")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level={"warn": logging.WARNING}.get(level, getattr(logging, level.upper())),
        format="%(asctime)s [%(levelname)s] %(process)d: %(message)s",
        datefmt="%Y/%m/%d %H:%M:%S", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(args.port)
    if args.command == "client":
        from .demo import run_client
        return run_client(args.url, args.messages)
    if args.command == "convert":
        from .convert import convert
        return convert(args.file, args.convert_prefix)
    if not args.config:
        print("fastws: a configuration file is required: fastws -c FILE (or try: fastws demo)",
              file=sys.stderr)
        return 1
    from . import balancer, config, dns
    try:
        if args.signal:
            with dns.offline():     # only the pid file and drain_on_term are needed
                cfg = config.load(args.config, args.format, args.prefix)
        else:
            cfg = config.load(args.config, args.format, args.prefix)
        from .worker import check_runtime
        checked = check_runtime(cfg, probe_engine=not args.signal)
    except ConfigError as exc:
        print(f"fastws: {exc}", file=sys.stderr)
        return 1
    if args.signal:
        from .master import send_signal
        return send_signal(cfg, args.signal)
    if args.test or args.dump:
        for line in cfg.ignored:
            print(f"fastws: ignored: {line}")
        for line in cfg.differences:
            print(f"fastws: differs from nginx: {line}")
        from .worker import descriptor_limit
        short = descriptor_limit(cfg, raise_soft=False)
        if short:
            print(f"fastws: warning: {short}")
        text = balancer.describe(checked.groups)
        if text and not args.dump:
            print(text)
        print(f"fastws: engine: {checked.backend} ({checked.why})")
        print(f"fastws: the configuration file {args.config} syntax is ok")
        print(f"fastws: configuration file {args.config} test is successful")
        if args.dump:
            from .convert import dump
            sys.stdout.write(dump(cfg))
        return 0
    return _serve(args.config, cfg, args.log_level)


def _serve(path: str, cfg: "Config", level: str) -> int:
    # The master binds, forks the workers (each makes its own event loop) and watches them.
    from .accesslog import setup_error_log
    from .master import Master
    setup_error_log(cfg.error_log, level)
    log = logging.getLogger("fastws")
    for line in cfg.differences:
        log.warning("differs from nginx: %s", line)
    return Master(path, cfg, level).run()


if __name__ == "__main__":
    sys.exit(main())
