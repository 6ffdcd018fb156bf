"""Which `Host` (and `Origin`) an HTTP request may name: the defence against DNS rebinding and blind
cross-site POSTs to a development server on loopback without keys.

A web page can make a browser send requests to 127.0.0.1 under a name it controls (DNS rebinding: the
`Host` header keeps the page's name), or POST to it from another site (`Origin` names that site). With
`--allowed-hosts` the HTTP front answers only requests whose `Host`, and `Origin` when there is one, name
one of them (`*`: any). Unset, it checks only where it matters and nothing else guards the port: no API
keys and a loopback address, where the allowed names are localhost, 127.0.0.1, ::1 and the bind address.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from service.config import ServerConfig

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address, brackets allowed) is a loopback address or localhost."""
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def allowed_hosts(config: ServerConfig) -> frozenset[str] | None:
    """The host names requests may name; None: any."""
    if config.allowed_hosts is not None:
        return None if "*" in config.allowed_hosts else frozenset(config.allowed_hosts)
    if config.keyed or not is_loopback(config.host):
        return None
    return frozenset((*LOOPBACK_NAMES, config.host.strip("[]").lower()))


def host_name(url: str) -> str:
    """The host of a URL or of a `Host` header value (`//name:port`, `//[v6]:port`), lower-case, without
    brackets; "" when there is none or it does not parse."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:  # an unclosed bracket
        return ""


def refusal(allowed: frozenset[str], host: str | None, origin: str | None) -> str | None:
    """Why a request with these `Host` and `Origin` headers is refused; None when it is not."""
    if host_name("//" + (host or "")) not in allowed:
        return f"the Host header {host!r} is not one of this server's names (--allowed-hosts)"
    if origin is not None and host_name(origin) not in allowed:
        return f"the Origin {origin!r} is not one of this server's names (--allowed-hosts)"
    return None
