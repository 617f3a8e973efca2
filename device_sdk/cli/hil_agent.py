"""``device-sdk hil-agent``: a line-oriented JSON service that a test rig drives on a device.

The hardware-in-the-loop rig (``hil/``) starts this command on the device, locally or over SSH,
and sends one JSON object per line on standard input. The agent writes one JSON reply per
request, one per line, on standard output. Operations:

- ``{"op": "hello"}``: the key's device_id, backend, algorithm and whether it is hardware-backed.
- ``{"op": "sign", "count": N}``: sign N random messages; latencies in milliseconds.
- ``{"op": "keys"}``: the keys in the key's store (PKCS#11 private keys, TPM persistent
  handles, secure element slots), to spot a token in use.
- ``{"op": "counter", "increment": true}``: the secure element's monotonic counter.
- ``{"op": "http-login"}`` and ``{"op": "mqtt-connect"}``: one login each, with its duration.
- ``{"op": "mqtt-start"}``, ``{"op": "mqtt-wait", "after": N, "timeout": S}``,
  ``{"op": "mqtt-stop"}``: keep an MQTT connection with automatic reconnects, and wait for a
  connection newer than attempt N (after the broker restarted).
- ``{"op": "quit"}``.

The key stays open between operations, so a token unplugged and plugged back between two
``sign`` operations exercises the backend's own recovery. A failed operation gets the reply
``{"ok": false, "error": ..., "error_type": ...}`` and the agent keeps serving. The agent never
prints a PIN or a token: errors come from :class:`~device_sdk.errors.DeviceSDKError` messages,
which exclude them.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from device_sdk.errors import ConfigError, DeviceSDKError

MAX_SIGN_COUNT = 100_000


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "hil-agent",
        help="serve JSON operations on stdin for the hardware-in-the-loop test rig",
        description=(
            "Read one JSON operation per line on stdin (sign, keys, counter, http-login, "
            "mqtt-connect, mqtt-start, mqtt-wait, mqtt-stop, hello, quit) and write one JSON "
            "reply per line on stdout. Used by the test rig in hil/; see docs/hil.md."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="PATH", help="device config file (after provisioning)")
    source.add_argument(
        "--key", metavar="URI", help="key URI, for sign and keys before provisioning"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="network timeout of each login step in seconds (default: 10)",
    )
    parser.set_defaults(handler=run)


class Agent:
    """The agent's state: the device config, the open key and a running MQTT client."""

    def __init__(self, config_path: str | None, key_uri: str | None, timeout: float) -> None:
        self.config: Any = None
        if config_path is not None:
            from device_sdk.config import export_softhsm2_conf, load_config

            self.config = load_config(config_path)
            export_softhsm2_conf(self.config)
            key_uri = self.config.key_uri
        assert key_uri is not None
        self.key_uri = key_uri
        self.timeout = timeout
        self._key: Any = None
        self._mqtt: Any = None
        self.operations: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "hello": self.hello,
            "sign": self.sign,
            "keys": self.keys,
            "counter": self.counter,
            "http-login": self.http_login,
            "mqtt-connect": self.mqtt_connect,
            "mqtt-start": self.mqtt_start,
            "mqtt-wait": self.mqtt_wait,
            "mqtt-stop": self.mqtt_stop,
        }

    @property
    def key(self) -> Any:
        if self._key is None:
            from device_sdk.keys import open_key

            self._key = open_key(self.key_uri)
        return self._key

    def _need_config(self, op: str) -> Any:
        if self.config is None:
            raise ConfigError(f"operation {op!r} needs the agent started with --config")
        return self.config

    def _ssl_context(self) -> ssl.SSLContext:
        config = self._need_config("login")
        if config.ca_bundle:
            return ssl.create_default_context(cafile=str(config.ca_bundle))
        return ssl.create_default_context()

    # --- operations ---------------------------------------------------------------------------

    def hello(self, request: dict[str, Any]) -> dict[str, Any]:
        from device_sdk.keys.info import algorithm_name

        key = self.key
        return {
            "device_id": key.device_id,
            "backend": key.backend,
            "hardware_backed": key.hardware_backed,
            "algorithm": algorithm_name(key.public_key()),
            "pid": os.getpid(),
        }

    def sign(self, request: dict[str, Any]) -> dict[str, Any]:
        count = request.get("count", 1)
        if (
            not isinstance(count, int)
            or isinstance(count, bool)
            or not 1 <= count <= MAX_SIGN_COUNT
        ):
            raise ConfigError(
                f"invalid sign count {count!r}: use an integer from 1 to {MAX_SIGN_COUNT}"
            )
        key = self.key
        public_key = key.public_key()
        latencies: list[float] = []
        for index in range(count):
            message = os.urandom(32)
            started = time.perf_counter()
            signature = _sign(key, message)
            latencies.append((time.perf_counter() - started) * 1000)
            if index == 0:
                # One verification proves the token signs with the key it reports.
                _verify(public_key, signature, message)
        return {
            "count": count,
            "latencies_ms": [round(value, 4) for value in latencies],
            "median_ms": round(statistics.median(latencies), 4),
        }

    def keys(self, request: dict[str, Any]) -> dict[str, Any]:
        scheme = self.key_uri.partition(":")[0].lower()
        listers = {
            "pkcs11": _pkcs11_private_key_labels,
            "tpm2": _tpm_persistent_handles,
            "serial": _serial_used_slots,
        }
        lister = listers.get(scheme)
        if lister is None:
            return {"supported": False, "scheme": scheme, "labels": []}
        labels = lister(self.key_uri)
        return {"supported": True, "scheme": scheme, "count": len(labels), "labels": labels}

    def counter(self, request: dict[str, Any]) -> dict[str, Any]:
        read_counter = getattr(self.key, "counter", None)
        if read_counter is None:
            raise ConfigError(f"the {self.key.backend} key backend has no monotonic counter")
        return {"value": read_counter(increment=bool(request.get("increment", True)))}

    def http_login(self, request: dict[str, Any]) -> dict[str, Any]:
        import httpx

        from device_sdk.http import DeviceAuth

        config = self._need_config("http-login")
        auth = DeviceAuth(self.key, config.verifier_url)
        started = time.perf_counter()
        with httpx.Client(verify=self._ssl_context(), timeout=self.timeout) as client:
            try:
                token = auth.login(client)
            except httpx.HTTPError as exc:
                raise_transport(f"HTTP login to {config.verifier_url} failed: {exc!r}")
        return {"ms": _since(started), "expires_in": token.expires_in}

    def _mqtt_client(self) -> Any:
        from device_sdk.mqtt import DeviceMqttClient

        config = self._need_config("mqtt")
        if config.broker_url is None:
            raise ConfigError("the device config has no broker_url, so there is no MQTT login")
        context = self._ssl_context()
        tls = config.broker_url.lower().startswith("mqtts:")
        return DeviceMqttClient(
            self.key,
            config.broker_url,
            verifier_url=config.verifier_url,
            verify=context,
            tls_context=context if tls else None,
            connect_timeout=self.timeout,
        )

    def mqtt_connect(self, request: dict[str, Any]) -> dict[str, Any]:
        client = self._mqtt_client()
        started = time.perf_counter()
        attempt = client.connect_once()
        seconds = _since(started)
        client.disconnect()
        return {"ms": seconds, "channel_bound": attempt.cb is not None}

    def mqtt_start(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._mqtt is not None:
            raise ConfigError("an MQTT client is already running; send mqtt-stop first")
        self._mqtt = self._mqtt_client()
        started = time.perf_counter()
        self._mqtt.start()
        connected = self._mqtt.wait_connected(float(request.get("timeout", self.timeout)))
        return {"connected": connected, "ms": _since(started), **self._mqtt_state()}

    def _mqtt_state(self) -> dict[str, Any]:
        attempts = list(self._mqtt.attempts)
        connected = [a.number for a in attempts if a.outcome == "connected"]
        return {
            "attempts": len(attempts),
            "last_connected_attempt": connected[-1] if connected else None,
            "outcomes": [a.outcome for a in attempts[-20:]],
            "error": str(self._mqtt.error) if self._mqtt.error else None,
        }

    def mqtt_wait(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._mqtt is None:
            raise ConfigError("no MQTT client is running; send mqtt-start first")
        after = int(request.get("after", 0))
        timeout = float(request.get("timeout", 60.0))
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self._mqtt_state()
            newest = state["last_connected_attempt"]
            if newest is not None and newest > after and self._mqtt.connected:
                return {"connected": True, "ms": _since(started), **state}
            time.sleep(0.05)
        return {"connected": False, "ms": _since(started), **self._mqtt_state()}

    def mqtt_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._mqtt is not None:
            self._mqtt.stop()
            self._mqtt = None
        return {}

    def close(self) -> None:
        self.mqtt_stop({})

    def handle(self, line: str) -> dict[str, Any] | None:
        try:
            request = json.loads(line)
        except json.JSONDecodeError as exc:
            return {
                "ok": False,
                "error": f"invalid JSON request: {exc}",
                "error_type": "ConfigError",
            }
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {
                "ok": False,
                "error": "a request is a JSON object with an 'op' string",
                "error_type": "ConfigError",
            }
        op = request["op"]
        if op == "quit":
            return None
        operation = self.operations.get(op)
        if operation is None:
            known = ", ".join(sorted([*self.operations, "quit"]))
            return {
                "ok": False,
                "op": op,
                "error": f"unknown op {op!r}: use one of {known}",
                "error_type": "ConfigError",
            }
        started = time.perf_counter()
        try:
            result = operation(request)
        except DeviceSDKError as exc:
            return {
                "ok": False,
                "op": op,
                "error": str(exc),
                "error_type": type(exc).__name__,
                "ms": _since(started),
            }
        return {"ok": True, "op": op, **result}


def raise_transport(message: str) -> None:
    from device_sdk.errors import TransportError

    raise TransportError(message) from None


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _sign(key: Any, message: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        digest = hashes.SHA384() if key.curve.key_size > 256 else hashes.SHA256()
        return key.sign(message, ec.ECDSA(digest))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, rsa.RSAPrivateKey):
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return key.sign(message, pad, hashes.SHA256())
    raise ConfigError(f"unsupported key type {type(key).__name__} for signing")


def _verify(public_key: Any, signature: bytes, message: bytes) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    from device_sdk.errors import KeyStoreError

    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            digest = hashes.SHA384() if public_key.curve.key_size > 256 else hashes.SHA256()
            public_key.verify(signature, message, ec.ECDSA(digest))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, rsa.RSAPublicKey):
            pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            public_key.verify(signature, message, pad, hashes.SHA256())
    except InvalidSignature:
        raise KeyStoreError(
            "the key's signature does not verify with its own public key: the token signed with "
            "another key or corrupted the signature"
        ) from None


def _pkcs11_private_key_labels(uri: str) -> list[str]:
    """Return the labels of every private key on the token the URI names (login required)."""
    from pkcs11 import Attribute, ObjectClass

    from device_sdk.keys import pkcs11
    from device_sdk.keys.pkcs11_session import find_objects, read_attribute, token_for
    from device_sdk.keys.uri import read_pin

    # NOTE: uses the PKCS#11 backend's private helpers (_parse, _load_module, _criteria),
    # because the backend has no public call that lists the keys on a token.
    parsed = pkcs11._parse(uri)
    module = pkcs11._load_module(parsed)
    token_criteria, _ = pkcs11._criteria(parsed)
    with module.lock:
        state = token_for(module, token_criteria, lambda: read_pin(parsed))
        objects = find_objects(state, {Attribute.CLASS: ObjectClass.PRIVATE_KEY}, "C_FindObjects")
        return sorted(str(read_attribute(obj, Attribute.LABEL) or "") for obj in objects)


# Owner-range persistent handles (TCG Provisioning Guidance); the endorsement (0x8101xxxx) and
# platform (0x818xxxxx) ranges hold keys the SDK never creates.
TPM_OWNER_PERSISTENT_FIRST = 0x81000000
TPM_OWNER_PERSISTENT_LAST = 0x8100FFFF


def _tpm_persistent_handles(uri: str) -> list[str]:
    """Return the owner-range persistent handles in the TPM that the URI names, as hex."""
    from tpm2_pytss.constants import TPM2_CAP

    from device_sdk.keys.tpm_connection import connection_for, resolve_tcti
    from device_sdk.keys.uri import Tpm2URI

    parsed = Tpm2URI.parse(uri)
    connection = connection_for(resolve_tcti(parsed.tcti))
    handles: list[int] = []
    with connection.lock:
        _, data = connection.call(
            "TPM2_GetCapability",
            connection.context.get_capability,
            TPM2_CAP.HANDLES,
            TPM_OWNER_PERSISTENT_FIRST,
            256,
        )
    handles = [int(handle) for handle in data.data.handles]
    return [
        f"0x{handle:08x}"
        for handle in handles
        if TPM_OWNER_PERSISTENT_FIRST <= handle <= TPM_OWNER_PERSISTENT_LAST
    ]


def _serial_used_slots(uri: str) -> list[str]:
    """Return the secure element slots that hold a key, probing each slot the firmware has."""
    from device_sdk.errors import KeyNotFoundError
    from device_sdk.keys import serial
    from device_sdk.keys.uri import SerialURI

    parsed = SerialURI.parse(uri)
    used: list[str] = []
    for slot in range(serial.device_info(parsed).slot_count):
        probe = SerialURI(device=parsed.device, baud=parsed.baud, slot=slot)
        try:
            serial.open_key(probe)
        except KeyNotFoundError:
            continue
        used.append(f"slot {slot}")
    return used


def run(args: argparse.Namespace) -> int:
    agent = Agent(args.config, args.key, args.timeout)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            reply = agent.handle(line)
            if reply is None:
                break
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        agent.close()
    return 0
