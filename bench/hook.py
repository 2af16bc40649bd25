"""The trivial synchronous hook of the `fastws-hook` target (bench/targets.py): what a location
with a hook costs per handshake beyond the same location without one."""

from fastws.hooks import Deny, Request


def check(request: Request) -> Deny | None:
    return None if request.method == "GET" else Deny(405)
