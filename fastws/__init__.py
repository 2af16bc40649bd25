"""fastws: a WebSocket-aware HTTP/1.1 reverse proxy with a splice(2) relay core."""

from ._version import __version__

__all__ = ["__version__"]
