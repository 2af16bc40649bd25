"""Route each tenant to its own upstream group by the subdomain it connects to.

`acme.chat.example.com` goes to the group `tenant_acme`, `globex.chat.example.com` to
`tenant_globex`; any other name gets 404 before an upstream is chosen.  The tenant goes
upstream as X-Tenant and into the access log as $hook_tenant.
"""

from __future__ import annotations

from fastws.hooks import Decision, Deny, Request

DOMAIN = ".chat.example.com"
TENANTS = {"acme": "tenant_acme", "globex": "tenant_globex"}


def route(request: Request) -> Decision | Deny:
    host = request.host
    tenant = host[:-len(DOMAIN)] if host.endswith(DOMAIN) else ""
    group = TENANTS.get(tenant)
    if group is None:
        return Deny(404, f"no tenant at {host or 'this address'}\n", log={"tenant": "-"})
    return Decision(upstream=group, set_headers={"X-Tenant": tenant}, log={"tenant": tenant})
