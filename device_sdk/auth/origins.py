"""Origins (scheme, host, port) of URLs, and the rule that secrets travel only over TLS.

A bearer token or a one-time enrollment token sent over plain ``http:`` can be read by anyone on
the path. Plain HTTP is accepted only for a loopback host (127.0.0.0/8, ``::1``, ``localhost``),
where the traffic never leaves the machine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import urlsplit

from device_sdk.errors import ConfigError

DEFAULT_PORTS = {"http": 80, "https": 443}


class Origin(NamedTuple):
    """The scheme, host and port of a URL, lowercased, with the scheme's default port filled in."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def origin_of(url: str) -> Origin | None:
    """Return the origin of an ``http:`` or ``https:`` URL, or None for any other URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return Origin(scheme, host, port if port is not None else DEFAULT_PORTS[scheme])


def is_loopback_host(host: str) -> bool:
    """Tell whether ``host`` is ``localhost`` or an address in 127.0.0.0/8 or ``::1``."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_secure_origin(origin: Origin) -> bool:
    """Tell whether a secret may be sent to ``origin``: over https, or to a loopback host."""
    return origin.scheme == "https" or is_loopback_host(origin.host)


def require_secure_url(url: str, url_name: str, secret: str) -> Origin:
    """Return the origin of ``url``, or raise ConfigError unless it is https or loopback http.

    ``url_name`` names the URL in the message ("verifier URL") and ``secret`` the thing that would
    travel in clear text ("the enrollment token").
    """
    origin = origin_of(url)
    if origin is None:
        raise ConfigError(
            f"invalid {url_name} {url!r}: expected an https:// URL with a host name, "
            "for example https://verifier.example.com"
        )
    if not is_secure_origin(origin):
        raise ConfigError(
            f"{url_name} {url!r} uses plain http, so {secret} would travel unencrypted; "
            f"use https://{url.split('://', 1)[1]} (plain http is accepted only for "
            "localhost, 127.0.0.0/8 and ::1)"
        )
    return origin


def token_origins(verifier_url: str, api_origins: Iterable[str] | None) -> frozenset[Origin]:
    """Return the origins that may receive a device's access token.

    Without ``api_origins`` that is the verifier's origin alone. Raises ConfigError for a URL
    that is not http(s) or is plain http to a host other than loopback.
    """
    urls = [verifier_url] if api_origins is None else list(api_origins)
    origins = set()
    for url in urls:
        url_name = "verifier URL" if api_origins is None else "API origin"
        origins.add(require_secure_url(url, url_name, "the access token"))
    return frozenset(origins)
