"""``device-sdk verifier``: serve the verifier, create enrollment tokens, manage devices.

The commands that manage the registry open the same SQLite database (``--db``) or PostgreSQL
registry (``--postgres``) that ``serve`` uses, so they work while a server is running. Nothing
here prints a secret, except the enrollment tokens that ``enrollment-token create`` exists to
print, and those go to stdout only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_sdk.errors import ConfigError, StoreError, VerificationError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8443
DEFAULT_LIMIT_CONCURRENCY = 1000

MAX_TOKEN_COUNT = 10_000
"""Maximum number of tokens one ``enrollment-token create`` makes; each is one database insert."""

# The management commands never check an assertion, so the issuer they configure is unused.
MANAGEMENT_ISSUER = "http://127.0.0.1"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "verifier",
        help="run the reference verifier and manage its devices",
        description="Serve the verifier's HTTP API, create enrollment tokens, list and revoke "
        "devices.",
    )
    commands = parser.add_subparsers(dest="verifier_command", metavar="COMMAND")
    commands.required = True
    _register_serve(commands)
    _register_enrollment_tokens(commands)
    _register_devices(commands)


def _add_registry_options(parser: argparse.ArgumentParser) -> None:
    registry = parser.add_mutually_exclusive_group(required=True)
    registry.add_argument(
        "--db", metavar="PATH", help="SQLite database of devices and challenges"
    )
    registry.add_argument(
        "--postgres", metavar="URL",
        help="PostgreSQL database of devices, shared by several verifiers "
        "(postgresql://user@host:5432/dbname). The URL must not contain the password: "
        "libpq reads it from PGPASSWORD, a PGPASSFILE or ~/.pgpass",
    )


def _register_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve the verifier's HTTP API with uvicorn",
        description="Serve challenges, tokens, enrollment, JWKS and the broker auth webhooks.",
    )
    _add_registry_options(parser)
    parser.add_argument(
        "--redis", metavar="URL",
        help="keep challenges in Redis (redis://host:port/db) so several verifiers share them; "
        "required with --postgres. The URL must not contain the password: set REDISCLI_AUTH",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})"
    )

    parser.add_argument("--tls-cert", metavar="PEM", help="server certificate chain (PEM)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (PEM)")
    parser.add_argument(
        "--issuer", metavar="URL",
        help="public URL of this verifier, the aud of HTTP logins "
        "(default: the scheme, host and port it listens on)",
    )
    parser.add_argument(
        "--issuer-cert", action="append", default=[], metavar="PEM",
        help="another certificate clients may see for the issuer URL (a rotation or a TLS "
        "terminating proxy); repeatable. --tls-cert is always included",
    )

    parser.add_argument(
        "--broker-audience", action="append", default=[], metavar="URL",
        help="broker URL whose MQTT logins this verifier checks, e.g. mqtt://127.0.0.1:1883; "
        "repeatable",
    )
    parser.add_argument(
        "--broker-cert", action="append", default=[], nargs=2, metavar=("URL", "PEM"),
        help="certificate of a TLS broker audience (mqtts://), for channel binding; repeatable",
    )
    parser.add_argument(
        "--nonceless-audience", action="append", default=[], metavar="URL",
        help="broker audience that also accepts assertions without a challenge nonce, single "
        "use only by their jti (weaker; for brokers whose clients cannot fetch a challenge); "
        "repeatable",
    )
    parser.add_argument(
        "--device-topic-prefix", metavar="PREFIX",
        help="the only MQTT topics a device may publish and subscribe to, through the broker "
        "webhooks and the amqtt plugin, e.g. 'devices/{device_id}/'; the MQTT client id must "
        "then start with the device id (default: any topic and client id)",
    )

    parser.add_argument(
        "--device-ca-cert", metavar="PEM",
        help="CA certificate that signs device client certificates at enrollment (for MQTT "
        "over mTLS); needs --device-ca-key",
    )
    parser.add_argument(
        "--device-ca-key", metavar="PEM",
        help="unencrypted private key of --device-ca-cert, a file of mode 0600",
    )
    parser.add_argument(
        "--device-cert-days", type=int, default=365, metavar="DAYS",
        help="lifetime of the device certificates in days (default: 365)",
    )
    parser.add_argument(
        "--ek-ca", action="append", default=[], metavar="PEM",
        help="trusted CA of TPM endorsement key (EK) certificates: self-signed ones are roots, "
        "others intermediates; repeatable. Enables TPM attestation at enrollment",
    )
    parser.add_argument(
        "--require-attestation", action="store_true",
        help="reject enrollments whose key no TPM attested (needs --ek-ca)",
    )

    parser.add_argument(
        "--signing-key", metavar="PEM",
        help="access-token signing key, created if absent (default: beside the --db database); "
        "required with --postgres, where every verifier must read the same key file",
    )
    parser.add_argument(
        "--leeway", type=int, default=30, metavar="SECONDS",
        help="clock skew allowed on iat and exp, in seconds (default: 30)",
    )
    parser.add_argument(
        "--access-token-lifetime", type=int, default=300, metavar="SECONDS",
        help="lifetime of access tokens in seconds (default: 300)",
    )
    parser.add_argument(
        "--challenge-lifetime", type=int, default=60, metavar="SECONDS",
        help="lifetime of challenges in seconds, at most 120 (default: 60)",
    )
    parser.add_argument(
        "--forwarded-allow-ips", metavar="IPS",
        help="comma-separated addresses of trusted reverse proxies, whose X-Forwarded-For and "
        "X-Forwarded-Proto headers then set the client address (default: the headers are "
        "ignored)",
    )
    parser.add_argument(
        "--broker-webhook-ips", metavar="IPS", default="",
        help="comma-separated addresses of brokers whose EMQX-style 'peerhost' field is trusted "
        "for the per-address failure limit (default: none, so 'peerhost' is ignored)",
    )
    parser.add_argument(
        "--limit-concurrency", type=int, default=DEFAULT_LIMIT_CONCURRENCY, metavar="N",
        help="connections and requests served at once; beyond them uvicorn responds 503 "
        f"(default: {DEFAULT_LIMIT_CONCURRENCY})",
    )
    parser.add_argument(
        "--no-rate-limits", action="store_true",
        help="turn off the per-device and per-address rate limits (benchmarks and tests only)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="level of the server and audit logs (default: info)",
    )
    parser.set_defaults(handler=run_serve)


def _register_enrollment_tokens(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = commands.add_parser(
        "enrollment-token", help="create one-time enrollment tokens",
        description="Manage the one-time tokens that let a device enroll its key.",
    )
    actions = parser.add_subparsers(dest="token_command", metavar="ACTION")
    actions.required = True
    create = actions.add_parser(
        "create", help="create enrollment tokens and print them to stdout",
        description="Create one-time enrollment tokens. Only their hashes are stored, so this "
        "is the only time the tokens are shown: hand them to provisioning in a file of mode 0600.",
    )
    _add_registry_options(create)
    create.add_argument(
        "--count", type=int, default=1,
        help=f"number of tokens, at most {MAX_TOKEN_COUNT} (default: 1)",
    )
    lifetime = create.add_mutually_exclusive_group()
    lifetime.add_argument(
        "--lifetime", type=int, metavar="SECONDS",
        help="seconds until an unused token expires (default: 7 days)",
    )
    lifetime.add_argument(
        "--never-expire", action="store_true", help="tokens stay valid until used"
    )
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(handler=run_create_tokens)


def _register_devices(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "devices", help="list, show and revoke enrolled devices",
        description="Inspect and revoke the devices in the registry.",
    )
    actions = parser.add_subparsers(dest="devices_command", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser("list", help="list every enrolled device")
    _add_registry_options(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(handler=run_list_devices)

    show = actions.add_parser("show", help="show one device record")
    _add_registry_options(show)
    show.add_argument("device_id",
        help="the device id (43 base64url characters; write -- before an id that starts with -)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=run_show_device)

    revoke = actions.add_parser(
        "revoke", help="revoke a device: no more challenges, logins or access tokens",
    )
    _add_registry_options(revoke)
    revoke.add_argument("device_id",
        help="the device id (43 base64url characters; write -- before an id that starts with -)")
    revoke.add_argument(
        "--redis", metavar="URL",
        help="the Redis URL the servers use, so the device's pending challenges are purged "
        "there; required with --postgres",
    )
    revoke.add_argument("--json", action="store_true", help="print the revoked record as JSON")
    revoke.set_defaults(handler=run_revoke_device)


# serve


def _listen_url(args: argparse.Namespace) -> str:
    scheme = "https" if args.tls_cert else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    return f"{scheme}://{host}:{args.port}"


def build_config(args: argparse.Namespace) -> Any:
    """Build the :class:`VerifierConfig` that ``serve`` options describe."""
    from device_sdk.verifier.config import (
        VerifierConfig,
        channel_bindings_from_pem,
        ek_certificates_from_pem,
    )

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: pass both for TLS, or neither")
    issuer = (args.issuer or _listen_url(args)).rstrip("/")

    issuer_certs = [args.tls_cert, *args.issuer_cert] if args.tls_cert else list(args.issuer_cert)
    if issuer.startswith("https:") and not issuer_certs:
        raise ConfigError(
            f"issuer {issuer} is an https URL, so the verifier needs the certificates clients "
            "see there for channel binding; pass --tls-cert or --issuer-cert"
        )
    http_bindings = channel_bindings_from_pem(*issuer_certs) if issuer.startswith("https:") else (
        frozenset()
    )

    broker_certs: dict[str, list[str]] = {}
    for url, path in args.broker_cert:
        broker_certs.setdefault(url, []).append(path)
    unknown = set(broker_certs) - set(args.broker_audience)
    if unknown:
        raise ConfigError(
            f"--broker-cert names {sorted(unknown)}, which are not --broker-audience URLs"
        )
    brokers = {
        url: channel_bindings_from_pem(*broker_certs[url]) if url in broker_certs else frozenset()
        for url in args.broker_audience
    }

    if bool(args.device_ca_cert) != bool(args.device_ca_key):
        raise ConfigError(
            "--device-ca-cert and --device-ca-key go together: pass both for a device CA, or "
            "neither"
        )
    if args.device_cert_days < 1:
        raise ConfigError(f"--device-cert-days must be at least 1, got {args.device_cert_days}")
    if args.require_attestation and not args.ek_ca:
        raise ConfigError(
            "--require-attestation needs --ek-ca with the EK root CA of the TPM makers to trust"
        )
    ek_roots, ek_intermediates = ek_certificates_from_pem(*args.ek_ca)

    settings: dict[str, Any] = {
        "issuer": issuer,
        "http_channel_bindings": http_bindings,
        "broker_audiences": brokers,
        "nonceless_audiences": frozenset(args.nonceless_audience),
        "device_topic_prefix": args.device_topic_prefix,
        "leeway": args.leeway,
        "access_token_lifetime": args.access_token_lifetime,
        "challenge_lifetime": args.challenge_lifetime,
        "ek_roots": ek_roots,
        "ek_intermediates": ek_intermediates,
        "require_attestation": args.require_attestation,
        "device_certificate_lifetime": args.device_cert_days * 24 * 3600,
    }
    if args.no_rate_limits:
        settings.update(
            challenge_limit_per_device=None,
            challenge_limit_per_address=None,
            failure_limit_per_device=None,
            failure_limit_per_address=None,
        )
    return VerifierConfig(**settings)


SHUTDOWN_TIMEOUT_S = 5
KEEP_ALIVE_TIMEOUT_S = 5
"""Seconds an idle connection is kept open after a response."""
MAX_INCOMPLETE_EVENT_BYTES = 16 * 1024
"""Largest request line and headers h11 buffers; a larger request gets 400."""


def uvicorn_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Return the connection settings of ``uvicorn.run`` that ``serve`` options describe.

    NOTE: uvicorn 0.55 has no timeout for reading request headers or a body: a client that
    sends part of a request keeps its connection open until it closes it. Serve the verifier
    behind a reverse proxy that times out slow clients (nginx client_header_timeout and
    client_body_timeout, HAProxy timeout http-request), and give its address here.
    """
    if args.limit_concurrency < 1:
        raise ConfigError(f"--limit-concurrency must be at least 1, got {args.limit_concurrency}")
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default, so any local process could
    # choose its audit address and rate-limit key. Only named proxies are trusted here.
    proxies = args.forwarded_allow_ips
    return {
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies or None,
        "limit_concurrency": args.limit_concurrency,
        "timeout_keep_alive": KEEP_ALIVE_TIMEOUT_S,
        "h11_max_incomplete_event_size": MAX_INCOMPLETE_EVENT_BYTES,
        # Without a limit, one idle keep-alive connection (TLS included) keeps a server that
        # got SIGTERM running for as long as the client keeps the connection open.
        "timeout_graceful_shutdown": SHUTDOWN_TIMEOUT_S,
    }


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from device_sdk.verifier.app import create_app
    from device_sdk.verifier.config import broker_name
    from device_sdk.verifier.core import Verifier
    from device_sdk.verifier.stores import RedisChallengeStore, check_redis_url

    config = build_config(args)
    server_settings = uvicorn_settings(args)
    if args.redis:
        check_redis_url(args.redis)
    if args.postgres:
        _check_postgres_serve_options(args)
    else:
        _check_database_dir(args.db)
    _check_port_free(args.host, args.port)
    logging.getLogger("device_sdk").setLevel(args.log_level.upper())
    verifier = Verifier.open(
        args.db,
        config,
        registry_url=args.postgres,
        redis_url=args.redis,
        signing_key_path=args.signing_key,
        device_ca_cert=args.device_ca_cert,
        device_ca_key=args.device_ca_key,
    )
    if isinstance(verifier.challenges, RedisChallengeStore):
        # Fail at start, with the reason, rather than with a 503 on every request.
        try:
            verifier.challenges.ping()
        except StoreError:
            verifier.close()
            raise
    webhook_brokers = [
        address.strip() for address in args.broker_webhook_ips.split(",") if address.strip()
    ]
    app = create_app(verifier, trusted_broker_addresses=webhook_brokers)
    brokers = ", ".join(config.broker_audiences) or "none"
    print(
        f"device-sdk verifier: serving {_listen_url(args)} (issuer {config.issuer}, brokers "
        f"{brokers}, registry in {'PostgreSQL' if args.postgres else 'SQLite'}, challenges in "
        f"{'Redis' if args.redis else 'SQLite'}, device CA "
        f"{'on' if args.device_ca_cert else 'off'}, TPM attestation "
        f"{_attestation_mode(config)})",
        file=sys.stderr,
    )
    for url in config.broker_audiences:
        print(
            f"device-sdk verifier: webhooks of broker {url}: "
            f"{_listen_url(args)}/v1/brokers/{broker_name(url)}/auth/rabbitmq and .../auth/emqx",
            file=sys.stderr,
        )
    if len(config.broker_audiences) > 1:
        print(
            "device-sdk verifier: warning: /v1/broker/auth/ accepts a password minted for any "
            "of these brokers; point each broker at its own /v1/brokers/<host:port>/auth/ path",
            file=sys.stderr,
        )
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            ssl_certfile=args.tls_cert,
            ssl_keyfile=args.tls_key,
            log_level=args.log_level,
            access_log=args.log_level == "debug",
            log_config=None,
            **server_settings,
        )
    finally:
        verifier.close()
    return 0


def _attestation_mode(config: Any) -> str:
    if config.require_attestation:
        return "required"
    return "offered" if config.ek_roots else "off"


def _check_port_free(host: str, port: int) -> None:
    """Raise ConfigError when ``host:port`` cannot be bound, before anything is created."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port or stop "
                "the process that uses it"
            ) from exc


def _check_postgres_serve_options(args: argparse.Namespace) -> None:
    from device_sdk.verifier.postgres import check_postgres_url

    check_postgres_url(args.postgres)
    if not args.redis:
        raise ConfigError(
            "--postgres is for several verifiers, which must share their challenges too; "
            "pass --redis redis://host:6379/0"
        )
    if not args.signing_key:
        raise ConfigError(
            "--postgres needs --signing-key PATH: every verifier must sign access tokens with "
            "the same key file, and there is no database file to keep it beside"
        )


def _check_database_dir(db: str) -> None:
    parent = Path(db).resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"database directory {parent} does not exist; create it first")


# enrollment tokens and devices


def _open_management_verifier(
    args: argparse.Namespace, redis_url: str | None = None, *, create: bool
) -> Any:
    from device_sdk.verifier.config import VerifierConfig
    from device_sdk.verifier.core import Verifier
    from device_sdk.verifier.registry import DeviceRegistry, SQLiteDeviceRegistry
    from device_sdk.verifier.stores import (
        ChallengeStore,
        MemoryChallengeStore,
        RedisChallengeStore,
        SQLiteChallengeStore,
        check_redis_url,
    )

    if redis_url:
        check_redis_url(redis_url)
    registry: DeviceRegistry
    challenges: ChallengeStore
    if args.postgres:
        from device_sdk.verifier.postgres import PostgresDeviceRegistry, check_postgres_url

        check_postgres_url(args.postgres)
        # Only revoke purges challenges; the other commands never touch them.
        challenges = (
            RedisChallengeStore.from_url(redis_url) if redis_url else MemoryChallengeStore()
        )
        try:
            registry = PostgresDeviceRegistry(args.postgres)
        except BaseException:
            challenges.close()
            raise
    else:
        db = args.db
        if not create and not Path(db).is_file():
            raise ConfigError(
                f"no verifier database at {db}; pass the --db that `device-sdk verifier serve` "
                "uses"
            )
        _check_database_dir(db)
        challenges = (
            RedisChallengeStore.from_url(redis_url) if redis_url else SQLiteChallengeStore(db)
        )
        registry = SQLiteDeviceRegistry(db)
    return Verifier(
        VerifierConfig(issuer=MANAGEMENT_ISSUER),
        registry=registry,
        challenges=challenges,
    )


def _registry_name(args: argparse.Namespace) -> str:
    """Name the registry in messages; a PostgreSQL URL is shown without user or password."""
    if args.postgres:
        from device_sdk.verifier.postgres import describe_postgres_url

        return f"the PostgreSQL registry at {describe_postgres_url(args.postgres)}"
    return str(args.db)


def run_create_tokens(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= MAX_TOKEN_COUNT:
        raise ConfigError(
            f"--count must be between 1 and {MAX_TOKEN_COUNT}, got {args.count}; "
            "run the command again for more tokens"
        )
    if args.lifetime is not None and args.lifetime < 1:
        raise ConfigError(f"--lifetime must be at least 1 second, got {args.lifetime}")

    verifier = _open_management_verifier(args, create=True)
    try:
        now = verifier.now()
        tokens = verifier.create_enrollment_tokens(
            args.count, lifetime=args.lifetime, never_expire=args.never_expire
        )
        lifetime = None if args.never_expire else (
            args.lifetime or verifier.config.enrollment_token_lifetime
        )
    finally:
        verifier.close()

    expires_at = None if lifetime is None else now + lifetime
    if args.json:
        print(json.dumps({"tokens": tokens, "expires_at": expires_at}))
    else:
        for token in tokens:
            print(token)
    return 0


def _record_json(record: Any) -> dict[str, Any]:
    data: dict[str, Any] = record.to_json()
    return data


def _timestamp(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_table(records: Sequence[Any]) -> None:
    print(f"{'DEVICE ID':<43}  {'STATUS':<7}  {'ALG':<5}  {'BACKEND':<8}  HARDWARE  ENROLLED")
    for record in records:
        # hardware_backed is only what the device claimed at enrollment. Attestation proves it.
        if record.attested:
            hardware = "attested"
        elif record.hardware_backed:
            hardware = "claimed"
        else:
            hardware = "no"
        print(
            f"{record.device_id:<43}  {record.status:<7}  {record.algorithm:<5}  "
            f"{record.backend:<8}  {hardware:<8}  {_timestamp(record.enrolled_at)}"
        )


def run_list_devices(args: argparse.Namespace) -> int:
    verifier = _open_management_verifier(args, create=False)
    try:
        records = verifier.list_devices()
    finally:
        verifier.close()
    if args.json:
        print(json.dumps([_record_json(record) for record in records], indent=2))
    else:
        _print_table(records)
    return 0


def run_show_device(args: argparse.Namespace) -> int:
    verifier = _open_management_verifier(args, create=False)
    try:
        record = verifier.get_device(args.device_id)
    finally:
        verifier.close()
    if record is None:
        raise ConfigError(
            f"device {args.device_id} is not enrolled in {_registry_name(args)}; "
            "`device-sdk verifier devices list` shows the enrolled ones"
        )
    if args.json:
        print(json.dumps(_record_json(record), indent=2))
    else:
        for name, value in _record_json(record).items():
            if name in ("enrolled_at", "revoked_at"):
                value = _timestamp(value)
            if name == "public_key_pem":
                print(f"{name}:\n{str(value).rstrip()}")
            else:
                print(f"{name}: {value}")
    return 0


def run_revoke_device(args: argparse.Namespace) -> int:
    if args.postgres and not args.redis:
        raise ConfigError(
            "revoke with --postgres needs the --redis URL that the verifiers use, so that the "
            "device's pending challenges are deleted there"
        )
    verifier = _open_management_verifier(args, args.redis, create=False)
    try:
        record = verifier.revoke(args.device_id)
    except VerificationError:
        raise ConfigError(
            f"device {args.device_id} is not enrolled in {_registry_name(args)}; "
            "`device-sdk verifier devices list` shows the enrolled ones"
        ) from None
    except StoreError as exc:
        # The registry commits the revocation before the challenges are purged, so the message
        # names the part that happened.
        revoked = verifier.get_device(args.device_id)
        if revoked is not None and not revoked.active:
            raise StoreError(
                f"device {args.device_id} is revoked in {_registry_name(args)}, but deleting "
                f"its pending challenges failed: {exc} Run the revoke again once that is fixed; "
                "until then its pending challenges are still refused, because the registry "
                "says revoked"
            ) from None
        raise
    finally:
        verifier.close()
    if args.json:
        print(json.dumps(_record_json(record), indent=2))
    else:
        print(f"revoked {record.device_id} at {_timestamp(record.revoked_at)}")
    return 0
