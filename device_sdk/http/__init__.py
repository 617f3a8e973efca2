"""HTTP login for devices: an ``httpx.Auth`` and a ``requests`` adapter over the same flow."""

from device_sdk.http.httpx_auth import REFRESH_MARGIN, DeviceAuth, TokenCache
from device_sdk.http.requests_auth import DeviceRequestsAuth
from device_sdk.http.tls import httpx_peer_certificate, requests_peer_certificate

__all__ = [
    "REFRESH_MARGIN",
    "DeviceAuth",
    "DeviceRequestsAuth",
    "TokenCache",
    "httpx_peer_certificate",
    "requests_peer_certificate",
]
