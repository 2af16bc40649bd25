"""nginx's configuration format: `fastws -c nginx.conf`.

syntax.py reads the files into a tree of directives (with `include`), directives.py says what
fastws does with each directive, and translate.py turns the tree into the same table a TOML
file gives, which config.from_dict checks: both formats make one kind of Config.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .syntax import Directive, looks_like_nginx, one_line, read
from .translate import Translation, translate

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["load", "looks_like_nginx", "read_translation"]


def read_translation(path: str, prefix: str | None = None) -> Translation:
    """The nginx configuration at `path` as the TOML-shaped table config.from_dict reads."""
    tree = read(path)
    return translate(tree, os.path.abspath(prefix) if prefix else
                     os.path.dirname(os.path.abspath(path)))


def load(path: str, prefix: str | None = None) -> "Config":
    """Read, translate and check an nginx configuration; a problem is one ConfigError naming
    FILE:LINE and the directive."""
    from ..config import from_dict
    t = read_translation(path, prefix)
    try:
        cfg = from_dict(t.data, path)
    except ConfigError as exc:
        d = _position(t.positions, exc.key)
        if d is None:
            raise
        raise ConfigError(d.where, "", one_line(f"\"{d.name}\": {exc.problem}")) from None
    return replace(cfg, format="nginx", prefix=prefix, ignored=tuple(t.ignored),
                   differences=tuple(t.differences), files=tuple(t.files))


def _position(positions: dict[str, Directive], key: str) -> Directive | None:
    """The directive behind a key of the table, or behind the nearest key that holds it."""
    while key:
        if key in positions:
            return positions[key]
        cut = max(key.rfind("."), key.rfind("["))
        if cut <= 0:
            break
        key = key[:cut]
    return positions.get(key)
