"""Count usage per customer: messages and bytes each way, and connected time.

The hook names the customer from the API key the client sends (X-Api-Key, or the `key` query
argument; 401 without a known one) and keeps it as $hook_customer; on_tunnel_close gets each
closed tunnel's figures with that value and adds them up.  The totals are written as JSON to
$FASTWS_USAGE_FILE (atomically: a reader never sees half a file) after each tunnel, from the
worker's callback thread, never from the relay.
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict

from fastws.hooks import Decision, Deny, Request, TunnelClosed

KEYS = {"key-acme": "acme", "key-globex": "globex"}
USAGE_FILE = os.environ.get("FASTWS_USAGE_FILE", "usage.json")

_lock = threading.Lock()
_usage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))


def identify(request: Request) -> Decision | Deny:
    key = request.headers.get("x-api-key") or request.args.get("key", "")
    customer = KEYS.get(key)
    if customer is None:
        return Deny(401, "an API key is required\n")
    return Decision(remove_headers=["X-Api-Key"], log={"customer": customer})


def count(tunnel: TunnelClosed) -> None:
    customer = tunnel.hook.get("customer", "unknown")
    with _lock:
        u = _usage[customer]
        u["tunnels"] += 1
        u["seconds"] += tunnel.duration
        u["messages_in"] += tunnel.messages_from_client
        u["messages_out"] += tunnel.messages_to_client
        u["bytes_in"] += tunnel.bytes_from_client
        u["bytes_out"] += tunnel.bytes_to_client
        snapshot = json.dumps({"pid": os.getpid(), "usage": _usage}, indent=2, sort_keys=True)
    path = f"{USAGE_FILE}.{os.getpid()}"     # one file per worker process
    with open(path + ".tmp", "w") as f:
        f.write(snapshot)
    os.replace(path + ".tmp", path)
