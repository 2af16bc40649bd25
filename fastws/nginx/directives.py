"""The nginx directives fastws knows: where each may appear, how many arguments it takes, and
whether fastws runs it, ignores it (it tunes only nginx itself) or refuses it (it would change
what a client or an upstream sees, and fastws does not do that).

Adding a directive: a row here; for USE, a branch in translate.py that turns it into the
TOML-shaped configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

MAIN, EVENTS, HTTP, SERVER, LOCATION, UPSTREAM = "main", "events", "http", "server", \
    "location", "upstream"
HSL = (HTTP, SERVER, LOCATION)
HS = (HTTP, SERVER)

USE, IGNORE, REFUSE = "use", "ignore", "refuse"


@dataclass(frozen=True, slots=True)
class Spec:
    contexts: tuple[str, ...]
    min_args: int
    max_args: int | None   # None: no limit
    action: str = USE
    advice: str = ""       # IGNORE: why it changes nothing; REFUSE: what to do instead
    block: bool = False


def _use(contexts: tuple[str, ...] | str, lo: int, hi: int | None = -1, *,
         block: bool = False) -> Spec:
    ctx = (contexts,) if isinstance(contexts, str) else contexts
    return Spec(ctx, lo, lo if hi == -1 else hi, USE, "", block)


def _ignore(contexts: tuple[str, ...] | str, why: str, lo: int = 0,
            hi: int | None = None, *, block: bool = False) -> Spec:
    ctx = (contexts,) if isinstance(contexts, str) else contexts
    return Spec(ctx, lo, hi, IGNORE, why, block)


def _refuse(contexts: tuple[str, ...] | str, advice: str, *, block: bool = False) -> Spec:
    ctx = (contexts,) if isinstance(contexts, str) else contexts
    return Spec(ctx, 0, None, REFUSE, advice, block)


_TUNES = "tunes nginx's own I/O"
_BUFFERS = "fastws sizes its buffers itself"
_TEMP = "fastws writes no temporary files"
_STATIC = ("fastws is a proxy and serves no files: give the location a proxy_pass, return or "
           "stub_status")

SPECS: dict[str, Spec] = {
    # --- main --------------------------------------------------------------------------------
    "user": _use(MAIN, 1, 2),
    "worker_processes": _use(MAIN, 1),
    "pid": _use(MAIN, 1),
    "error_log": _use((MAIN, HTTP, SERVER, LOCATION), 1, 2),
    "events": _use(MAIN, 0, block=True),
    "http": _use(MAIN, 0, block=True),
    "worker_shutdown_timeout": _use(MAIN, 1),
    "worker_rlimit_nofile": _ignore(MAIN, "fastws raises its open-file limit to what "
                                    "worker_connections needs", 1, 1),
    "daemon": _ignore(MAIN, "fastws runs in the foreground (use a service manager)", 1, 1),
    "master_process": _ignore(MAIN, "fastws always runs a master and its workers", 1, 1),
    "pcre_jit": _ignore(MAIN, "fastws compiles its regular expressions itself", 1, 1),
    "worker_cpu_affinity": _use(MAIN, 1, None),
    "worker_priority": _ignore(MAIN, "set the priority with the service manager", 1, 1),
    "timer_resolution": _ignore(MAIN, "fastws's timers have their own resolution", 1, 1),
    "lock_file": _ignore(MAIN, "fastws takes no accept lock", 1, 1),
    "thread_pool": _ignore(MAIN, "fastws does no file I/O in threads", 1),
    "env": _ignore(MAIN, "fastws's workers keep the master's environment", 1, 1),
    "working_directory": _ignore(MAIN, "fastws writes no core files of its own", 1, 1),
    "worker_rlimit_core": _ignore(MAIN, "fastws writes no core files of its own", 1, 1),
    "load_module": _ignore(MAIN, "fastws loads no nginx modules (a directive of the module "
                           "is refused where it is used)", 1, 1),
    "stream": _refuse(MAIN, "fastws proxies HTTP and WebSocket, not raw TCP (stream {})",
                      block=True),
    "mail": _refuse(MAIN, "fastws does not proxy mail", block=True),
    # --- events ------------------------------------------------------------------------------
    "worker_connections": _use(EVENTS, 1),
    "use": _ignore(EVENTS, "fastws picks its event mechanism itself", 1, 1),
    "multi_accept": _ignore(EVENTS, "fastws accepts in batches always", 1, 1),
    "accept_mutex": _ignore(EVENTS, "fastws takes no accept lock", 1, 1),
    "accept_mutex_delay": _ignore(EVENTS, "fastws takes no accept lock", 1, 1),
    "worker_aio_requests": _ignore(EVENTS, _TUNES, 1, 1),
    "debug_connection": _ignore(EVENTS, "fastws has no per-address debug log", 1, 1),
    # --- http, server, location --------------------------------------------------------------
    "include": _use((MAIN, EVENTS, HTTP, SERVER, LOCATION, UPSTREAM), 1),
    "upstream": _use(HTTP, 1, block=True),
    "map": _use(HTTP, 2, block=True),
    "log_format": _use(HTTP, 2, None),
    "access_log": _use(HSL, 1, None),
    "server": _use((HTTP, UPSTREAM), 0, None),   # a block in http, a line in upstream
    "listen": _use(SERVER, 1, None),
    "server_name": _use(SERVER, 1, None),
    "location": _use((SERVER, LOCATION), 1, 2, block=True),
    "return": _use((SERVER, LOCATION), 1, 2),
    "stub_status": _use(LOCATION, 0, 1),
    "keepalive_timeout": _use(HSL + (UPSTREAM,), 1, 2),
    "keepalive_requests": _use(HSL + (UPSTREAM,), 1),
    "client_max_body_size": _use(HSL, 1),
    "client_body_timeout": _use(HSL, 1),
    "client_header_timeout": _use(HS, 1),
    "large_client_header_buffers": _use(HS, 2),
    "ssl_certificate": _use(HS, 1),
    "ssl_certificate_key": _use(HS, 1),
    "ssl_protocols": _use(HS, 1, None),
    "ssl_ciphers": _use(HS, 1),
    "ssl_session_tickets": _use(HS, 1),
    "ssl_prefer_server_ciphers": _ignore(HS, "fastws's TLS follows the server's order of "
                                         "ciphers for TLS 1.2", 1, 1),
    "ssl_session_cache": _ignore(HS, "fastws's TLS keeps sessions with tickets", 1, 2),
    "ssl_session_timeout": _ignore(HS, "fastws's TLS keeps sessions with tickets", 1, 1),
    "ssl_dhparam": _ignore(HS, "fastws's TLS uses elliptic-curve key exchange", 1, 1),
    "ssl_ecdh_curve": _ignore(HS, "fastws's TLS uses OpenSSL's default curves", 1, 1),
    "ssl_buffer_size": _ignore(HS, _BUFFERS, 1, 1),
    "ssl_stapling": _ignore(HS, "fastws does not staple OCSP answers", 1, 1),
    "ssl_stapling_verify": _ignore(HS, "fastws does not staple OCSP answers", 1, 1),
    "ssl": _refuse(HS, "write \"listen ... ssl\" instead (nginx removed \"ssl on\")"),
    "proxy_pass": _use(LOCATION, 1),
    "proxy_http_version": _use(HSL, 1),
    "proxy_set_header": _use(HSL, 2),
    "proxy_connect_timeout": _use(HSL, 1),
    "proxy_send_timeout": _use(HSL, 1),
    "proxy_read_timeout": _use(HSL, 1),
    "proxy_socket_keepalive": _use(HSL, 1),
    "proxy_next_upstream": _use(HSL, 1, None),
    "proxy_next_upstream_tries": _use(HSL, 1),
    "proxy_next_upstream_timeout": _use(HSL, 1),
    "proxy_ssl_verify": _use(HSL, 1),
    "proxy_ssl_trusted_certificate": _use(HSL, 1),
    "proxy_ssl_server_name": _use(HSL, 1),
    "proxy_ssl_name": _use(HSL, 1),
    "proxy_buffering": _ignore(HSL, "fastws relays answers as they come, without buffering "
                               "them to disk", 1, 1),
    "proxy_request_buffering": _ignore(HSL, "fastws relays request bodies as they come", 1, 1),
    "proxy_redirect": _use(HSL, 1, 2),
    "proxy_buffer_size": _ignore(HSL, _BUFFERS, 1, 1),
    "proxy_buffers": _ignore(HSL, _BUFFERS, 2, 2),
    "proxy_busy_buffers_size": _ignore(HSL, _BUFFERS, 1, 1),
    "proxy_max_temp_file_size": _ignore(HSL, _TEMP, 1, 1),
    "proxy_temp_file_write_size": _ignore(HSL, _TEMP, 1, 1),
    "proxy_headers_hash_max_size": _ignore(HSL, _BUFFERS, 1, 1),
    "proxy_headers_hash_bucket_size": _ignore(HSL, _BUFFERS, 1, 1),
    "proxy_ssl_session_reuse": _ignore(HSL, "fastws's upstream TLS reuses sessions", 1, 1),
    "proxy_ssl_protocols": _ignore(HSL, "fastws's upstream TLS uses TLS 1.2 and 1.3", 1),
    "proxy_ssl_ciphers": _ignore(HSL, "fastws's upstream TLS uses OpenSSL's defaults", 1, 1),
    "sendfile": _ignore(HSL, _TUNES, 1, 1),
    "sendfile_max_chunk": _ignore(HSL, _TUNES, 1, 1),
    "tcp_nopush": _ignore(HSL, _TUNES, 1, 1),
    "tcp_nodelay": _ignore(HSL, "fastws sets TCP_NODELAY on every connection", 1, 1),
    "aio": _ignore(HSL, _TUNES, 1, 2),
    "directio": _ignore(HSL, _TUNES, 1, 1),
    "output_buffers": _ignore(HSL, _BUFFERS, 2, 2),
    "postpone_output": _ignore(HSL, _BUFFERS, 1, 1),
    "client_body_buffer_size": _ignore(HSL, _BUFFERS, 1, 1),
    "client_header_buffer_size": _ignore(HS, _BUFFERS, 1, 1),
    "connection_pool_size": _ignore(HS, _BUFFERS, 1, 1),
    "request_pool_size": _ignore(HS, _BUFFERS, 1, 1),
    "types": _ignore(HSL, "fastws serves no files, so it needs no MIME types", block=True),
    "types_hash_max_size": _ignore(HSL, _BUFFERS, 1, 1),
    "types_hash_bucket_size": _ignore(HSL, _BUFFERS, 1, 1),
    "default_type": _ignore(HSL, "fastws serves no files, so it needs no MIME types", 1, 1),
    "server_names_hash_max_size": _ignore(HTTP, _BUFFERS, 1, 1),
    "server_names_hash_bucket_size": _ignore(HTTP, _BUFFERS, 1, 1),
    "variables_hash_max_size": _ignore(HTTP, _BUFFERS, 1, 1),
    "variables_hash_bucket_size": _ignore(HTTP, _BUFFERS, 1, 1),
    "map_hash_max_size": _ignore(HTTP, _BUFFERS, 1, 1),
    "map_hash_bucket_size": _ignore(HTTP, _BUFFERS, 1, 1),
    "client_body_temp_path": _ignore(HSL, _TEMP, 1, 4),
    "proxy_temp_path": _ignore(HSL, _TEMP, 1, 4),
    "fastcgi_temp_path": _ignore(HSL, _TEMP, 1, 4),
    "uwsgi_temp_path": _ignore(HSL, _TEMP, 1, 4),
    "scgi_temp_path": _ignore(HSL, _TEMP, 1, 4),
    "open_file_cache": _ignore(HSL, "fastws opens no files per request", 1, 2),
    "open_file_cache_valid": _ignore(HSL, "fastws opens no files per request", 1, 1),
    "open_file_cache_min_uses": _ignore(HSL, "fastws opens no files per request", 1, 1),
    "open_file_cache_errors": _ignore(HSL, "fastws opens no files per request", 1, 1),
    "open_log_file_cache": _ignore(HSL, "fastws keeps its log files open", 1, 4),
    "log_not_found": _ignore(HSL, "fastws serves no files", 1, 1),
    "log_subrequest": _ignore(HSL, "fastws makes no subrequests", 1, 1),
    "reset_timedout_connection": _ignore(HSL, "fastws closes a timed-out connection at once",
                                         1, 1),
    "server_tokens": _ignore(HSL, "fastws's own answers carry no version", 1, 1),
    "resolver": _use(HSL, 1, None),
    "resolver_timeout": _use(HSL, 1),
    "root": _ignore(HSL, "used only to serve files, which fastws does not do", 1, 1),
    "index": _ignore(HSL, "used only to serve files, which fastws does not do", 1),
    "send_timeout": _ignore(HSL, "fastws applies proxy_send_timeout to a write that stays "
                            "blocked", 1, 1),
    "ignore_invalid_headers": _ignore(HS, "fastws refuses invalid header names with 400", 1, 1),
    "underscores_in_headers": _use(HS, 1),
    "gzip": _use(HSL, 1),
    **{name: _ignore(HSL, "fastws does not compress answers (see gzip)", 1, None)
       for name in ("gzip_vary", "gzip_proxied", "gzip_comp_level", "gzip_buffers",
                    "gzip_http_version", "gzip_types", "gzip_min_length", "gzip_disable")},
    "charset": _use(HSL, 1),
    "absolute_redirect": _ignore(HSL, "fastws makes no redirects of its own but "
                                 "redirect_https", 1, 1),
    "port_in_redirect": _ignore(HSL, "fastws makes no redirects of its own but "
                                "redirect_https", 1, 1),
    "server_name_in_redirect": _ignore(HSL, "fastws makes no redirects of its own but "
                                       "redirect_https", 1, 1),
    "msie_padding": _ignore(HSL, "fastws makes no error pages of its own", 1, 1),
    "lingering_close": _ignore(HSL, _TUNES, 1, 1),
    "lingering_time": _ignore(HSL, _TUNES, 1, 1),
    "lingering_timeout": _ignore(HSL, _TUNES, 1, 1),
    "keepalive_time": _ignore(HSL + (UPSTREAM,), "fastws bounds keep-alive connections by "
                              "keepalive_requests and keepalive_timeout", 1, 1),
    "keepalive_disable": _ignore(HSL, "fastws keeps every HTTP/1.1 client alive", 1),
    "zone": _ignore(UPSTREAM, "fastws's workers each keep the group's state", 1, 2),
    # --- upstream ----------------------------------------------------------------------------
    "ip_hash": _use(UPSTREAM, 0),
    "hash": _use(UPSTREAM, 1, 2),
    "least_conn": _use(UPSTREAM, 0),
    "keepalive": _use(UPSTREAM, 1),
    "random": _refuse(UPSTREAM, "not supported by fastws: use least_conn, or hash with "
                      "consistent"),
    "sticky": _use(UPSTREAM, 2, None),
    "ntlm": _refuse(UPSTREAM, "not supported by fastws"),
    "queue": _refuse(UPSTREAM, "not supported by fastws: requests over max_conns get 502"),
    # --- refused: each would change what clients or upstreams see ----------------------------
    "if": _refuse((SERVER, LOCATION), "fastws has no \"if\": use separate locations, or a "
                  "Python hook", block=True),
    "rewrite": _refuse((SERVER, LOCATION), "fastws does not rewrite URIs: use proxy_pass with "
                       "a URI part"),
    "set": _refuse((SERVER, LOCATION), "fastws has no \"set\": use map"),
    "try_files": _refuse((SERVER, LOCATION), _STATIC),
    "alias": _refuse(LOCATION, _STATIC),
    "autoindex": _refuse(HSL, _STATIC),
    "error_page": _refuse(HSL, "fastws relays the upstream's error pages and makes its own "
                          "short ones: remove the line"),
    "add_header": _refuse(HSL, "fastws does not add response headers"),
    "expires": _refuse(HSL, "fastws does not add response headers"),
    "proxy_hide_header": _refuse(HSL, "fastws relays the upstream's response headers as "
                                 "they are"),
    "proxy_pass_header": _refuse(HSL, "fastws relays the upstream's response headers as "
                                 "they are"),
    "proxy_ignore_headers": _refuse(HSL, "fastws relays the upstream's response headers as "
                                    "they are"),
    "proxy_intercept_errors": _refuse(HSL, "fastws relays the upstream's error pages"),
    "proxy_pass_request_headers": _refuse(HSL, "fastws always passes the request's headers"),
    "proxy_pass_request_body": _refuse(HSL, "fastws always passes the request's body"),
    "proxy_set_body": _refuse(HSL, "fastws always passes the request's body"),
    "proxy_method": _refuse(HSL, "fastws passes the client's method"),
    "proxy_ignore_client_abort": _refuse(HSL, "fastws closes the upstream connection when the "
                                         "client goes away"),
    "proxy_bind": _refuse(HSL, "fastws lets the kernel choose the upstream source address"),
    "proxy_cookie_domain": _refuse(HSL, "fastws does not rewrite cookies"),
    "proxy_cookie_path": _refuse(HSL, "fastws does not rewrite cookies"),
    "proxy_cookie_flags": _refuse(HSL, "fastws does not rewrite cookies"),
    "proxy_cache": _refuse(HSL, "fastws does not cache answers"),
    "proxy_cache_path": _refuse(HTTP, "fastws does not cache answers"),
    "proxy_store": _refuse(HSL, "fastws does not cache answers"),
    "proxy_ssl_certificate": _refuse(HSL, "fastws does not present client certificates to "
                                     "upstreams yet"),
    "proxy_ssl_certificate_key": _refuse(HSL, "fastws does not present client certificates "
                                         "to upstreams yet"),
    "proxy_protocol": _refuse(SERVER, "the stream module's; to send the PROXY protocol to "
                              "upstreams, write send_proxy_protocol v1|v2 in the upstream block"),
    "ssl_client_certificate": _use(HS, 1),
    "ssl_verify_client": _use(HS, 1),
    "ssl_trusted_certificate": _refuse(HS, "fastws does not staple OCSP answers"),
    "fastcgi_pass": _refuse(LOCATION, "fastws proxies HTTP only: use proxy_pass"),
    "uwsgi_pass": _refuse(LOCATION, "fastws proxies HTTP only: use proxy_pass"),
    "scgi_pass": _refuse(LOCATION, "fastws proxies HTTP only: use proxy_pass"),
    "grpc_pass": _refuse(LOCATION, "fastws proxies HTTP/1.1 only: use proxy_pass"),
    "memcached_pass": _refuse(LOCATION, "fastws proxies HTTP only: use proxy_pass"),
    # fastws's own (nginx would not read them): the WebSocket Origin check
    "websocket_origins": _use(HSL, 1, None),
    "websocket_origin_missing": _use(HSL, 1),
    "websocket_idle_timeout": _use(HSL, 1),
    "forwarded_headers": _use(HSL, 1),
    "websocket_max_lifetime": _use(HSL, 1, 2),
    # ... and the frames of WebSocket tunnels (docs/websocket.md)
    "websocket_frames": _use(HSL, 1),
    "websocket_frame_checks": _use(HSL, 1),
    "websocket_max_message_size": _use(HSL, 1),
    "websocket_ping": _use(HSL, 1, 3),
    "websocket_close_timeout": _use(HSL, 1),
    "websocket_close_spread": _use(MAIN, 1),
    # ... and Python hooks (docs/extending.md)
    "fastws_hook": _use(HSL, 1),
    "fastws_hook_requests": _use(HSL, 1),
    "fastws_hook_timeout": _use(HSL, 1),
    "fastws_on_tunnel_close": _use(HSL, 1),
    "send_proxy_protocol": _use((UPSTREAM,), 1),
    "allow": _use(HSL, 1),
    "deny": _use(HSL, 1),
    "auth_basic": _refuse(HSL, "fastws does not authenticate clients: let the upstream do it"),
    "auth_basic_user_file": _refuse(HSL, "fastws does not authenticate clients: let the "
                                    "upstream do it"),
    "auth_request": _refuse(HSL, "fastws makes no subrequests: let the upstream authenticate"),
    "limit_req": _use(HSL, 1, 3),
    "limit_req_zone": _use(HTTP, 3, 4),
    "limit_conn": _use(HSL, 2),
    "limit_conn_zone": _use(HTTP, 2),
    "limit_req_status": _use(HSL, 1),
    "limit_conn_status": _use(HSL, 1),
    "limit_req_log_level": _ignore(HSL, "fastws logs a refusal at error and a delay at warn, "
                                   "nginx's default levels", 1, 1),
    "limit_conn_log_level": _ignore(HSL, "fastws logs a refusal at error, nginx's default "
                                    "level", 1, 1),
    "limit_req_dry_run": _refuse(HSL, "fastws enforces its limits: remove the limit_req "
                                 "lines instead"),
    "limit_conn_dry_run": _refuse(HSL, "fastws enforces its limits: remove the limit_conn "
                                  "lines instead"),
    "limit_rate": _refuse(HSL, "fastws does not slow down answers"),
    "set_real_ip_from": _use(HS, 1),
    "real_ip_header": _use(HS, 1),
    "real_ip_recursive": _use(HS, 1),
    "sub_filter": _refuse(HSL, "fastws does not rewrite answers"),
    "ssi": _refuse(HSL, "fastws does not rewrite answers"),
    "http2": _refuse(HS, "fastws speaks HTTP/1.1 (and WebSocket over it)"),
    "http3": _refuse(HS, "fastws speaks HTTP/1.1 (and WebSocket over it)"),
    "internal": _refuse(LOCATION, "fastws has no internal redirects"),
    "satisfy": _refuse(HSL, "fastws does not authenticate clients"),
}


def markdown(action: str) -> str:
    """docs/nginx.md's table of the directives fastws ignores or refuses (a test keeps the
    page equal to this)."""
    head = "why it changes nothing" if action == IGNORE else "what to do instead"
    rows = [f"| `{name}` | {spec.advice} |" for name, spec in sorted(SPECS.items())
            if spec.action == action]
    return "\n".join([f"| directive | {head} |", "|---|---|", *rows]) + "\n"
