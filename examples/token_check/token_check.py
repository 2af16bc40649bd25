"""Check a signed token before the WebSocket upgrade.

The client brings a JWT (HS256) in the `token` query argument or the `token` cookie; it is
verified with PyJWT against the secret in $FASTWS_JWT_SECRET (a missing secret fails
`fastws -t`, since this module is imported then).  Without a valid token the client gets 401
and no upstream sees the request; with one, the upstream gets the user as X-User (and never the
token), and the access log can show it as $hook_user.
"""

from __future__ import annotations

import os

import jwt

from fastws.hooks import Decision, Deny, Request

SECRET = os.environ.get("FASTWS_JWT_SECRET", "")
if not SECRET:
    raise RuntimeError("set FASTWS_JWT_SECRET to the tokens' signing secret")

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="chat"'}


def check(request: Request) -> Decision | Deny:
    token = request.args.get("token") or request.variable("cookie_token")
    if not token:
        return Deny(401, "a token is required\n", headers=_CHALLENGE, log={"user": "-"})
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"],
                            options={"require": ["exp", "sub"]})
    except jwt.PyJWTError as exc:
        return Deny(401, f"invalid token: {exc}\n", headers=_CHALLENGE, log={"user": "-"})
    user = str(claims["sub"])
    return Decision(set_headers={"X-User": user}, log={"user": user})
