"""``device-sdk login``: log in once over HTTP and once over MQTT, and print the timings."""

from __future__ import annotations

import argparse
import dataclasses
import json
import ssl
import time
from typing import Any

from device_sdk.auth.origins import require_secure_url
from device_sdk.config import DeviceConfig, export_softhsm2_conf, load_config
from device_sdk.errors import ConfigError, DeviceSDKError, TransportError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "login",
        help="log in to the verifier (HTTP) and the broker (MQTT) once, with timings",
        description=(
            "Log in with the device key named in the config file: over HTTP (challenge, "
            "assertion, access token) and over MQTT (CONNECT with a signed assertion). "
            "Without --http or --mqtt, both run, MQTT only where the config has a broker_url."
        ),
    )
    parser.add_argument("--config", required=True, metavar="PATH", help="device config file")
    parser.add_argument("--http", action="store_true", help="log in over HTTP")
    parser.add_argument("--mqtt", action="store_true", help="log in over MQTT")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS",
        help="network timeout of each step in seconds (default: 10)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    export_softhsm2_conf(config)
    require_secure_url(config.verifier_url, f"verifier_url in {args.config}", "the access token")
    do_http = args.http or not args.mqtt
    do_mqtt = args.mqtt or (not args.http and config.broker_url is not None)
    if args.mqtt and config.broker_url is None:
        raise ConfigError(f"{args.config} has no broker_url, so there is no MQTT login to run")

    opened = time.perf_counter()
    key = _open_key(config)
    report: dict[str, Any] = {
        "device_id": config.device_id,
        "key_open_ms": round((time.perf_counter() - opened) * 1000, 2),
    }
    if do_http:
        report["http"] = _step(lambda: login_http(key, config, args.timeout))
    if do_mqtt:
        report["mqtt"] = _step(lambda: login_mqtt(key, config, args.timeout))

    ok = all(report[name]["ok"] for name in ("http", "mqtt") if name in report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0 if ok else 1


def _open_key(config: DeviceConfig) -> Any:
    from device_sdk.keys import open_key
    from device_sdk.keys.uri import Pkcs11URI, parse_key_uri

    uri = config.key_uri
    parsed = parse_key_uri(uri)
    # The config may name the PIN file beside the URI instead of inside it.
    if isinstance(parsed, Pkcs11URI) and parsed.pin_source is None and config.pin_source:
        uri = str(dataclasses.replace(parsed, pin_source=config.pin_source))
    key = open_key(uri)
    if key.device_id != config.device_id:
        raise ConfigError(
            f"the key at {key.uri} has device id {key.device_id}, but the config file has "
            f"device_id {config.device_id}; provision again or fix key_uri"
        )
    return key


def _step(action: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result: dict[str, Any] = action()
    except DeviceSDKError as exc:
        return {
            "ok": False,
            "error": str(exc),
            "ms": round((time.perf_counter() - started) * 1000, 2),
        }
    result["ok"] = True
    result["ms"] = round((time.perf_counter() - started) * 1000, 2)
    return result


def _verify_setting(config: DeviceConfig) -> str | bool:
    return str(config.ca_bundle) if config.ca_bundle else True


def login_http(key: Any, config: DeviceConfig, timeout: float) -> dict[str, Any]:
    """Run the HTTP login flow against the verifier; returns timings and the token lifetime."""
    import httpx

    from device_sdk.http import DeviceAuth

    auth = DeviceAuth(key, config.verifier_url)
    with httpx.Client(verify=_ssl_context(config), timeout=timeout) as client:
        try:
            token = auth.login(client)
        except httpx.HTTPError as exc:
            raise TransportError(f"HTTP login to {config.verifier_url} failed: {exc!r}") from None
    return {"verifier_url": config.verifier_url, "expires_in": token.expires_in}


def login_mqtt(key: Any, config: DeviceConfig, timeout: float) -> dict[str, Any]:
    """Connect to the broker once with a fresh assertion, then disconnect."""
    from device_sdk.mqtt import DeviceMqttClient

    assert config.broker_url is not None
    context = _ssl_context(config)
    tls = config.broker_url.lower().startswith("mqtts:")
    client = DeviceMqttClient(
        key,
        config.broker_url,
        verifier_url=config.verifier_url,
        verify=context,
        tls_context=context if tls else None,
        connect_timeout=timeout,
    )
    attempt = client.connect_once()
    client.disconnect()
    return {"broker_url": config.broker_url, "channel_bound": attempt.cb is not None}


def _ssl_context(config: DeviceConfig) -> ssl.SSLContext:
    if config.ca_bundle:
        return ssl.create_default_context(cafile=str(config.ca_bundle))
    return ssl.create_default_context()


def _print_text(report: dict[str, Any]) -> None:
    print(f"device {report['device_id']} (key opened in {report['key_open_ms']} ms)")
    for name in ("http", "mqtt"):
        if name not in report:
            continue
        step = report[name]
        if step["ok"]:
            print(f"{name}: logged in in {step['ms']} ms")
        else:
            print(f"{name}: failed after {step['ms']} ms: {step['error']}")
