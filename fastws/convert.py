"""`fastws convert nginx.conf` and `fastws -T`: an nginx configuration as fastws's TOML.

The TOML is the table the nginx translation hands to config.from_dict, written out with
tomli-w, so that loading it gives the same configuration (a test checks the round trip).
"""

from __future__ import annotations

import sys

import tomli_w

from .config import Config
from .errors import ConfigError


def to_toml(path: str, prefix: str | None = None) -> str:
    """The TOML equivalent of the nginx configuration at `path`, with what was ignored and
    where fastws differs as comments; raise ConfigError if it does not check."""
    from .nginx import load, read_translation
    load(path, prefix)     # every check, with errors located in the nginx files
    t = read_translation(path, prefix)
    head = [f"# fastws configuration converted from {path}"]
    head += [f"# ignored: {line}" for line in t.ignored]
    head += [f"# differs from nginx: {line}" for line in t.differences]
    return "\n".join(head) + "\n\n" + tomli_w.dumps(t.data)


def convert(path: str, prefix: str | None = None) -> int:
    try:
        text = to_toml(path, prefix)
    except ConfigError as exc:
        print(f"fastws: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def dump(cfg: Config) -> str:
    """nginx -T's output: each file read, as written; for an nginx configuration, then the
    TOML that fastws runs."""
    out = []
    for path in cfg.files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            text = f"# cannot read: {exc.strerror}\n"
        out.append(f"# configuration file {path}:\n{text}")
        if not text.endswith("\n"):
            out.append("\n")
    if cfg.format == "nginx":
        out.append("\n# as fastws runs it (fastws convert):\n")
        out.append(to_toml(cfg.files[0], cfg.prefix))
    return "".join(out)

