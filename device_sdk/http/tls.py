"""The server certificate of the TLS connection that carried an HTTP response.

The channel binding must hash the certificate of the connection actually used, not one fetched
on the side, so these helpers read it from the response's own connection:

- httpx (httpcore 1.x): ``response.extensions["network_stream"]`` gives the stream, and its
  ``get_extra_info("ssl_object")`` the ``ssl.SSLObject`` (async) or the C-level ``_ssl._SSLSocket``
  (sync). Both take the binary-form flag positionally only, hence ``getpeercert(True)``.
- requests (urllib3 2.x): ``response.raw.connection.sock`` is the ``ssl.SSLSocket``, but only
  while the response body is unread. urllib3 returns the connection to its pool once the body is
  read, so the request must be sent with ``stream=True``.
"""

from __future__ import annotations

from typing import Any

from device_sdk.errors import ProtocolError


def peer_certificate(ssl_object: Any, url: str) -> bytes:
    """Return the DER certificate the server presented on ``ssl_object``."""
    if ssl_object is None:
        raise ProtocolError(
            f"no TLS connection under the answer from {url}, so the login cannot be bound to the "
            "server certificate; use an https URL and a transport with a network stream"
        )
    certificate = ssl_object.getpeercert(True)
    if not certificate:
        raise ProtocolError(f"the server at {url} presented no certificate")
    return bytes(certificate)


def httpx_peer_certificate(response: Any) -> bytes:
    """Return the DER server certificate of the connection that carried an ``httpx.Response``."""
    url = str(response.request.url)
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    return peer_certificate(ssl_object, url)


def requests_peer_certificate(response: Any) -> bytes:
    """Return the DER server certificate of a ``requests.Response`` sent with ``stream=True``."""
    url = str(response.url)
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    return peer_certificate(sock, url)
