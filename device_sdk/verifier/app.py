"""The verifier's HTTP API: a FastAPI app over one :class:`~device_sdk.verifier.core.Verifier`.

Endpoints (wire format in ``docs/protocol.md``):

- ``POST /v1/challenges``, ``POST /v1/token``, ``POST /v1/enroll``
- ``POST /v1/enroll/attestation``: round one of TPM attestation (404 without trusted EK roots)
- ``GET /.well-known/jwks.json``, ``GET /healthz``
- ``GET /v1/whoami``: a sample protected resource that takes ``Authorization: Bearer``
- ``POST /v1/broker/auth/rabbitmq/{user,vhost,resource,topic}``: RabbitMQ's HTTP auth backend
  (form posts, plain ``allow`` or ``deny`` responses)
- ``POST /v1/broker/auth/emqx``: EMQX-style HTTP authentication (JSON or form body)

Request bodies are read by hand, not through model binding, so every malformed request gets a
4xx: 413 over :data:`MAX_BODY_BYTES`, 415 for another content type, 400 for anything that does
not decode to the expected object. The verifier's rejections become a plain 401
``{"error": "unauthorized"}`` (429 with ``Retry-After`` for rate limits); the reason goes to the
audit log with the client address, never to the caller.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from device_sdk.auth.encoding import loads_json_object
from device_sdk.errors import ProtocolError, StoreError, VerificationError
from device_sdk.verifier.audit import log_decision
from device_sdk.verifier.config import broker_name
from device_sdk.verifier.core import Verifier

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024
"""Largest request body read. The biggest legitimate one is an enrollment with a 16 KiB CSR."""

MAX_FORM_FIELDS = 32

RABBITMQ_PREFIX = "/v1/broker/auth/rabbitmq"
EMQX_PATH = "/v1/broker/auth/emqx"
# The same webhooks for one broker, named by the host and port of its audience URL
# (config.broker_name): a login there must carry exactly that broker's aud.
BROKER_RABBITMQ_PREFIX = "/v1/brokers/{broker}/auth/rabbitmq"
BROKER_EMQX_PATH = "/v1/brokers/{broker}/auth/emqx"
# EMQX's HTTP authorizer: may this client publish or subscribe to a topic?
EMQX_AUTHZ_PATH = "/v1/broker/authz/emqx"
BROKER_EMQX_AUTHZ_PATH = "/v1/brokers/{broker}/authz/emqx"
_ROUTING_KEY_TO_TOPIC = str.maketrans({".": "/", "/": ".", "*": "+"})

UNAUTHORIZED = {"error": "unauthorized"}
RATE_LIMITED = {"error": "rate_limited"}

JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"

RABBITMQ_PERMISSIONS = frozenset({"configure", "write", "read"})


class ClientGone(Exception):
    """The client closed the connection before it sent the whole request body."""


class RequestRejected(Exception):
    """A request rejected before it reached the verifier: bad size, type or shape."""

    def __init__(self, status_code: int, error: str, detail: str) -> None:
        self.status_code = status_code
        self.error = error
        self.detail = detail
        super().__init__(f"HTTP {status_code} {error}: {detail}")


def client_address(request: Request) -> str | None:
    """Return the peer address of the request (the proxy's, unless uvicorn rewrites it)."""
    return request.client.host if request.client is not None else None


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """Read the request body, stopping with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestRejected(400, "invalid_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise RequestRejected(
                413, "request_too_large", f"body of {declared} bytes exceeds {limit}"
            )

    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestRejected(413, "request_too_large", f"body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # One line and no traceback: anyone can cause this, so it must be cheap to log.
        logger.info(
            "client %s disconnected after %d bytes of the body of %s %s",
            client_address(request),
            size,
            request.method,
            request.url.path,
        )
        raise ClientGone from None
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _require_media_type(request: Request, expected: str) -> None:
    media_type = _media_type(request)
    if media_type != expected:
        raise RequestRejected(
            415, "unsupported_media_type", f"content type {media_type[:64]!r}, expected {expected}"
        )


async def read_json_object(request: Request) -> dict[str, Any]:
    """Read a JSON object body strictly: no duplicate keys, no NaN, UTF-8 only."""
    _require_media_type(request, JSON_TYPE)
    body = await read_body(request)
    try:
        value = loads_json_object(body)
    except ProtocolError as exc:
        raise RequestRejected(400, "invalid_request", str(exc)) from None
    if _contains_lone_surrogate(value):
        # JSON allows an escaped lone surrogate such as "\ud800", but it is no Unicode text and
        # has no UTF-8 encoding, so every later .encode() of it would raise.
        raise RequestRejected(400, "invalid_request", "JSON string contains a lone surrogate")
    return value


def _contains_lone_surrogate(value: Any) -> bool:
    """Tell whether any string in a decoded JSON value, key or value, is not valid Unicode."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


async def read_form(request: Request) -> dict[str, str]:
    """Read a URL-encoded form body; a repeated field is an error, not a list."""
    _require_media_type(request, FORM_TYPE)
    body = await read_body(request)
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=bool(body),
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestRejected(400, "invalid_request", f"form does not parse: {exc}") from None

    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise RequestRejected(400, "invalid_request", f"form field {name[:64]!r} repeated")
        form[name] = value
    return form


def require_string(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise RequestRejected(400, "invalid_request", f"field {name!r} must be a string")
    return value


def require_bool(data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name)
    if not isinstance(value, bool):
        raise RequestRejected(400, "invalid_request", f"field {name!r} must be true or false")
    return value


def unauthorized(headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(UNAUTHORIZED, status_code=401, headers=dict(headers or {}))


def rejection_response(exc: VerificationError) -> JSONResponse:
    """Map a verifier rejection to 429 with ``Retry-After`` or to a plain 401."""
    if exc.reason == "rate_limited":
        wait = exc.retry_after if exc.retry_after is not None else 1.0
        seconds = max(1, math.ceil(wait))
        return JSONResponse(RATE_LIMITED, status_code=429, headers={"Retry-After": str(seconds)})
    return unauthorized()


def bearer_token(request: Request) -> str | None:
    """Return the token of an ``Authorization: Bearer`` header, or None if there is none."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def create_app(
    verifier: Verifier,
    *,
    rabbitmq_vhost: str = "/",
    rabbitmq_exchange: str = "amq.topic",
    trusted_broker_addresses: Collection[str] = (),
) -> FastAPI:
    """Build the ASGI app for ``verifier``.

    ``rabbitmq_vhost`` is the only virtual host devices may use, and ``rabbitmq_exchange`` the
    exchange the RabbitMQ MQTT plugin publishes to (``mqtt.exchange``, ``amq.topic`` by default).
    ``trusted_broker_addresses`` are the socket addresses of brokers whose EMQX-style
    ``peerhost`` field is believed for the per-address failure limit.
    """
    app = FastAPI(
        title="device-sdk verifier",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.verifier = verifier

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        # Nobody receives this response: uvicorn drops what is sent after a disconnect.
        return Response(status_code=400)

    @app.exception_handler(RequestRejected)
    async def request_rejected(request: Request, exc: RequestRejected) -> Response:
        log_decision(
            "request",
            "reject",
            reason="unknown_broker" if exc.error == "unknown_broker" else "malformed",
            client_address=client_address(request),
            detail=exc.detail,
            path=request.url.path,
            status=exc.status_code,
        )
        return JSONResponse({"error": exc.error}, status_code=exc.status_code)

    @app.exception_handler(StoreError)
    async def store_failed(request: Request, exc: StoreError) -> Response:
        # The registry database or Redis is down, or the connection dropped. The next request
        # connects again, so the client may retry soon.
        logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"error": "unavailable"}, status_code=503, headers={"Retry-After": "1"}
        )

    async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # The stores block on SQLite or Redis, so verifier calls run in the thread pool.
        return await run_in_threadpool(function, *args, **kwargs)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/.well-known/jwks.json")
    async def jwks() -> Response:
        return JSONResponse(verifier.jwks(), headers={"Cache-Control": "public, max-age=300"})

    @app.post("/v1/challenges")
    async def challenges(request: Request) -> Response:
        body = await read_json_object(request)
        device_id = require_string(body, "device_id")
        audience = require_string(body, "audience")
        try:
            challenge = await call(
                verifier.issue_challenge, device_id, audience, client_address(request)
            )
        except VerificationError as exc:
            if exc.reason == "malformed":
                return JSONResponse({"error": "invalid_request"}, status_code=400)
            return rejection_response(exc)
        return JSONResponse(challenge, headers={"Cache-Control": "no-store"})

    @app.post("/v1/token")
    async def token(request: Request) -> Response:
        body = await read_json_object(request)
        assertion = require_string(body, "assertion")
        try:
            verified = await call(
                verifier.verify_assertion,
                assertion,
                audience_kind="http",
                client_address=client_address(request),
            )
        except VerificationError as exc:
            return rejection_response(exc)
        answer = await call(verifier.issue_access_token, verified)
        return JSONResponse(answer, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    @app.post("/v1/enroll/attestation")
    async def enroll_attestation(request: Request) -> Response:
        if not verifier.offers_attestation:
            return JSONResponse({"error": "not_found"}, status_code=404)
        body = await read_json_object(request)
        enrollment_token = require_string(body, "enrollment_token")
        fields = ("ek_certificate", "ak_public", "key_public")
        attestation_request = {name: require_string(body, name) for name in fields}
        try:
            challenge = await call(
                verifier.start_attestation,
                enrollment_token,
                attestation_request,
                client_address(request),
            )
        except VerificationError as exc:
            return rejection_response(exc)
        return JSONResponse(challenge, headers={"Cache-Control": "no-store"})

    @app.post("/v1/enroll")
    async def enroll(request: Request) -> Response:
        body = await read_json_object(request)
        csr = require_string(body, "csr")
        enrollment_token = require_string(body, "enrollment_token")
        backend = require_string(body, "backend")
        hardware_backed = require_bool(body, "hardware_backed")
        attestation = body.get("attestation")
        if attestation is not None and not isinstance(attestation, dict):
            raise RequestRejected(400, "invalid_request", "field 'attestation' must be an object")
        try:
            enrollment = await call(
                verifier.enroll_device,
                csr,
                enrollment_token,
                backend,
                hardware_backed,
                client_address(request),
                attestation=attestation,
            )
        except VerificationError as exc:
            return rejection_response(exc)
        answer = {"device": enrollment.record.to_json(), "certificate": enrollment.certificate_pem}
        return JSONResponse(answer, status_code=201 if enrollment.created else 200)

    @app.get("/v1/whoami")
    async def whoami(request: Request) -> Response:
        challenge_header = {"WWW-Authenticate": 'Bearer realm="device-sdk"'}
        address = client_address(request)
        token_text = bearer_token(request)
        if token_text is None:
            log_decision(
                "access_token",
                "reject",
                reason="malformed",
                client_address=address,
                detail="no Bearer authorization header",
            )
            return unauthorized(challenge_header)
        try:
            claims = await call(verifier.verify_access_token, token_text)
        except VerificationError as exc:
            log_decision(
                "access_token",
                "reject",
                reason=exc.reason,
                device_id=exc.device_id,
                client_address=address,
                detail=exc.detail,
            )
            return unauthorized(challenge_header)
        log_decision("access_token_use", "accept", device_id=claims["sub"], client_address=address)
        return JSONResponse({"device_id": claims["sub"], "expires_at": claims["exp"]})

    register_broker_webhooks(
        app, verifier, call, rabbitmq_vhost, rabbitmq_exchange, frozenset(trusted_broker_addresses)
    )
    return app


def register_broker_webhooks(
    app: FastAPI,
    verifier: Verifier,
    call: Callable[..., Any],
    rabbitmq_vhost: str,
    rabbitmq_exchange: str,
    trusted_brokers: frozenset[str] = frozenset(),
) -> None:
    """Add the RabbitMQ and EMQX HTTP auth endpoints, which check broker logins with ``verifier``.

    The CONNECT username is the device id and the password a fresh assertion whose ``aud`` is one
    of the verifier's broker audiences. Under ``/v1/brokers/<host:port>/auth/`` the ``aud`` must be
    that broker's, so that one broker cannot replay a password it received at another. After
    the login, RabbitMQ checks the virtual host, resources and topics, and EMQX's authorizer
    topics. An active device may use every topic, or with ``device_topic_prefix`` its own only.

    NOTE: the webhooks take no credentials of their own, so anyone who can reach them can learn
    whether a device id is active. Expose them only to the broker (loopback or a private network).
    """

    async def read_emqx_body(request: Request) -> Mapping[str, Any]:
        # EMQX sends JSON by default and a form when its authenticator is set up that way.
        if _media_type(request) == FORM_TYPE:
            return await read_form(request)
        return await read_json_object(request)

    def allow(allowed: bool) -> PlainTextResponse:
        return PlainTextResponse("allow" if allowed else "deny")

    def named_broker(request: Request) -> str | None:
        """Return the audience a /v1/brokers/<name>/ path names, or None on the other paths."""
        name = request.path_params.get("broker")
        if name is None:
            return None
        audience = verifier.config.broker_audience_named(name)
        if audience is None:
            raise RequestRejected(
                404,
                "unknown_broker",
                f"no broker audience has the host and port {name[:100]!r}; use one of "
                f"{sorted(broker_name(url) for url in verifier.config.broker_audiences)}",
            )
        return audience

    async def check_login(
        request: Request,
        username: str,
        password: str,
        client_id: str | None,
        address: str | None,
        *,
        limit_address: bool,
    ) -> bool:
        # Checked first, so that a refused client id spends no nonce.
        if not verifier.config.client_id_allowed(username, client_id):
            log_decision(
                "assertion",
                "reject",
                reason="wrong_client_id",
                device_id=username or None,
                client_address=address,
                detail="the MQTT client id does not start with the device id",
                kind="mqtt",
            )
            return False
        try:
            await call(
                verifier.verify_assertion,
                password,
                audience_kind="mqtt",
                client_address=address,
                expected_device_id=username,
                limit_address=limit_address,
                expected_audience=named_broker(request),
            )
        except VerificationError:
            # Verifier.verify_assertion has already written the audit line with the reason.
            return False
        return True

    def topic_permitted(username: str, topic: str, action: str, address: str | None) -> bool:
        """Apply the verifier's device topic policy, and audit a topic it rejects."""
        if verifier.config.topic_allowed(username, topic):
            return True
        log_decision(
            "broker_topic",
            "reject",
            reason="wrong_topic",
            device_id=username or None,
            client_address=address,
            topic=topic,
            action=action,
        )
        return False

    async def device_is_active(username: str, event: str, address: str | None) -> bool:
        record = await call(verifier.get_device, username) if username else None
        if record is None or not record.active:
            reason = "unknown_device" if record is None else "revoked_device"
            log_decision(
                event, "reject", reason=reason, device_id=username or None, client_address=address
            )
            return False
        return True

    async def rabbitmq_user(request: Request) -> Response:
        named_broker(request)
        form = await read_form(request)
        username = require_string(form, "username")
        password = require_string(form, "password")
        # RabbitMQ's user check carries no client address, so the peer here is the broker,
        # whose failure budget all its devices would share: no per-address limit then.
        return allow(
            await check_login(
                request,
                username,
                password,
                form.get("client_id"),
                client_address(request),
                limit_address=False,
            )
        )

    async def rabbitmq_vhost_check(request: Request) -> Response:
        named_broker(request)
        form = await read_form(request)
        username = require_string(form, "username")
        vhost = require_string(form, "vhost")
        address = form.get("ip") or client_address(request)
        if vhost != rabbitmq_vhost:
            log_decision(
                "broker_vhost",
                "reject",
                reason="wrong_audience",
                device_id=username or None,
                client_address=address,
                vhost=vhost,
            )
            return allow(False)
        return allow(await device_is_active(username, "broker_vhost", address))

    async def rabbitmq_resource(request: Request) -> Response:
        named_broker(request)
        form = await read_form(request)
        username = require_string(form, "username")
        vhost = require_string(form, "vhost")
        resource = require_string(form, "resource")
        name = require_string(form, "name")
        permission = require_string(form, "permission")
        address = client_address(request)
        if (
            vhost != rabbitmq_vhost
            or resource not in ("exchange", "queue", "topic")
            or permission not in RABBITMQ_PERMISSIONS
            or (resource == "exchange" and name != rabbitmq_exchange)
        ):
            log_decision(
                "broker_resource",
                "reject",
                reason="wrong_audience",
                device_id=username or None,
                client_address=address,
                vhost=vhost,
                resource=resource,
                name=name,
                permission=permission,
            )
            return allow(False)
        return allow(await device_is_active(username, "broker_resource", address))

    async def rabbitmq_topic(request: Request) -> Response:
        named_broker(request)
        form = await read_form(request)
        username = require_string(form, "username")
        vhost = require_string(form, "vhost")
        require_string(form, "resource")
        name = require_string(form, "name")
        permission = require_string(form, "permission")
        routing_key = form.get("routing_key", "")
        address = client_address(request)
        if vhost != rabbitmq_vhost or name != rabbitmq_exchange:
            log_decision(
                "broker_topic",
                "reject",
                reason="wrong_audience",
                device_id=username or None,
                client_address=address,
                vhost=vhost,
                name=name,
            )
            return allow(False)
        # RabbitMQ's MQTT plugin swaps "/" and "." between MQTT topics and routing keys, and
        # writes the "+" of a topic filter as "*".
        topic = routing_key.translate(_ROUTING_KEY_TO_TOPIC)
        if not topic_permitted(username, topic, permission, address):
            return allow(False)
        return allow(await device_is_active(username, "broker_topic", address))

    async def emqx_authz(request: Request) -> Response:
        named_broker(request)
        body = await read_emqx_body(request)
        username = require_string(body, "username")
        topic = require_string(body, "topic")
        action = require_string(body, "action")
        address = client_address(request)
        allowed = topic_permitted(username, topic, action, address) and await device_is_active(
            username, "broker_topic", address
        )
        return JSONResponse({"result": "allow" if allowed else "deny"})

    async def emqx(request: Request) -> Response:
        named_broker(request)
        body = await read_emqx_body(request)
        username = require_string(body, "username")
        password = require_string(body, "password")
        # Anyone who reaches this endpoint can write any peerhost. Charging failures to it
        # unchecked would let a caller lock out the address of a real device, so the field
        # counts only when the request comes from a trusted broker.
        caller = client_address(request)
        peer = body.get("peerhost")
        from_trusted_broker = caller in trusted_brokers
        client_id = body.get("clientid")
        client_id = client_id if isinstance(client_id, str) else None
        if isinstance(peer, str) and peer and from_trusted_broker:
            allowed = await check_login(
                request, username, password, client_id, peer, limit_address=True
            )
        else:
            allowed = await check_login(
                request, username, password, client_id, caller, limit_address=False
            )
        answer: dict[str, Any] = {"result": "allow" if allowed else "deny"}
        if allowed:
            answer["is_superuser"] = False
        return JSONResponse(answer)

    rabbitmq_checks = {
        "/user": rabbitmq_user,
        "/vhost": rabbitmq_vhost_check,
        "/resource": rabbitmq_resource,
        "/topic": rabbitmq_topic,
    }
    for prefix in (RABBITMQ_PREFIX, BROKER_RABBITMQ_PREFIX):
        for suffix, endpoint in rabbitmq_checks.items():
            app.add_api_route(prefix + suffix, endpoint, methods=["POST"])
    for path in (EMQX_PATH, BROKER_EMQX_PATH):
        app.add_api_route(path, emqx, methods=["POST"])
    for path in (EMQX_AUTHZ_PATH, BROKER_EMQX_AUTHZ_PATH):
        app.add_api_route(path, emqx_authz, methods=["POST"])
