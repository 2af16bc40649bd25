"""fastws: a WebSocket-aware HTTP/1.1 reverse proxy with a splice(2) relay core.

`fastws.serve(config)` and `fastws.Proxy(config)` run it from Python (fastws/embed.py);
fastws.hooks holds what Python hooks are given and return.
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .embed import Proxy, serve

__all__ = ["Proxy", "__version__", "serve"]


def __getattr__(name: str) -> Any:
    # imported when used: `import fastws.config` loads no runtime module
    if name in ("Proxy", "serve"):
        from . import embed
        return getattr(embed, name)
    raise AttributeError(f"module 'fastws' has no attribute {name!r}")
