"""The demo's MQTT broker: embedded amqtt whose logins are checked by the verifier plugin.

Run as a child process of ``device-sdk demo``::

    python -m device_sdk.cli.demo_broker --db DB --issuer URL --port P --audience mqtt://...

It opens the verifier's SQLite database (devices and challenges), so a challenge issued by the
verifier's HTTP server is accepted here once, and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m device_sdk.cli.demo_broker")
    parser.add_argument("--db", required=True, type=Path, help="the verifier's SQLite database")
    parser.add_argument("--issuer", required=True, help="the verifier's issuer URL")
    parser.add_argument("--issuer-cert", help="the verifier's TLS certificate (PEM)")
    parser.add_argument("--port", required=True, type=int, help="TCP port on 127.0.0.1")
    parser.add_argument("--audience", required=True, help="this broker's URL, the MQTT aud")
    parser.add_argument("--tls-cert", help="broker certificate (PEM); with --tls-key, serve TLS")
    parser.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    from amqtt.broker import Broker

    from device_sdk.verifier import VerifierConfig, channel_bindings_from_pem
    from device_sdk.verifier.amqtt_plugin import broker_config
    from device_sdk.verifier.core import Verifier

    http_bindings = channel_bindings_from_pem(args.issuer_cert) if args.issuer_cert else frozenset()
    broker_bindings = channel_bindings_from_pem(args.tls_cert) if args.tls_cert else frozenset()
    config = VerifierConfig(
        issuer=args.issuer,
        http_channel_bindings=http_bindings,
        broker_audiences={args.audience: broker_bindings},
        # The demo publishes to devices/<its id>/demo, so it runs with the topic policy on.
        device_topic_prefix="devices/{device_id}/",
    )
    verifier = Verifier.open(args.db, config)
    broker_settings = broker_config(
        verifier, host="127.0.0.1", port=args.port, audience=args.audience
    )
    if args.tls_cert:
        broker_settings["listeners"]["default"].update(
            {"ssl": True, "certfile": args.tls_cert, "keyfile": args.tls_key}
        )
    broker = Broker(broker_settings)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    await broker.start()
    print(f"demo broker: listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()
        verifier.close()
    print("demo broker: stopped", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
