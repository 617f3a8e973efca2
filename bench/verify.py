"""Verifier throughput against raw ECDSA P-256 verification, measured in one run.

The full path is :meth:`Verifier.verify_assertion` on fresh ES256 assertions: strict parsing,
header and claim checks, the registry lookup (SQLite), the atomic nonce consume and the signature
check. The baseline is ``cryptography``'s ECDSA P-256 ``verify`` of the very same assertions:
the same device keys, signing inputs and signatures (converted to DER beforehand). Challenges
and assertions are prepared in untimed chunks between rounds.

The target, a ratio of at least 0.70, applies to the ``sqlite`` store: the embedded default,
opened by ``Verifier.open`` as the ``verifier serve`` command does. ``memory`` shows the same
path with the nonce kept in memory (and the registry still in SQLite).

Usage: ``python bench/verify.py [--json] [--count N] [--store memory|sqlite|both]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from device_sdk.auth import Challenge, build_assertion, device_id_of
from device_sdk.auth.encoding import b64url_decode
from device_sdk.verifier import (
    MemoryChallengeStore,
    SQLiteDeviceRegistry,
    Verifier,
    VerifierConfig,
)
from device_sdk.verifier.stores import MAX_OUTSTANDING_CHALLENGES

ISSUER = "http://127.0.0.1:8080"
DEVICES = 50
# A store drops a device's oldest challenges beyond MAX_OUTSTANDING_CHALLENGES, so assertions are
# prepared in chunks of half that per device, untimed, between rounds.
CHALLENGES_PER_DEVICE = MAX_OUTSTANDING_CHALLENGES // 2
CHUNK = DEVICES * CHALLENGES_PER_DEVICE
ROUND = 100
TARGET_STORE = "sqlite"
TARGET_RATIO = 0.70

RawCheck = tuple[ec.EllipticCurvePublicKey, bytes, bytes]


def make_verifier(directory: Path, store: str) -> Verifier:
    # Challenge issue limits are off so one run can prepare thousands of challenges; the
    # failure limit stays on because it is read on every verification.
    config = VerifierConfig(
        issuer=ISSUER, challenge_limit_per_device=None, challenge_limit_per_address=None
    )
    if store == "sqlite":
        # The embedded default, exactly as `device-sdk verifier serve` opens it.
        return Verifier.open(directory / "verifier.db", config)
    registry = SQLiteDeviceRegistry(directory / "verifier.db")
    return Verifier(config, registry=registry, challenges=MemoryChallengeStore())


def enroll_devices(verifier: Verifier, count: int) -> list[ec.EllipticCurvePrivateKey]:
    """Enroll ``count`` software P-256 keys and return them."""
    keys = []
    for _ in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id_of(key))]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
        token = verifier.create_enrollment_tokens()[0]
        verifier.enroll(csr, token, "software", False)
        keys.append(key)
    return keys


def prepare(
    verifier: Verifier, keys: list[ec.EllipticCurvePrivateKey], count: int
) -> tuple[list[str], list[RawCheck]]:
    """Sign ``count`` HTTP login assertions, one fresh challenge each, keys taken in turn.

    Returns the assertions and, for each one, the raw baseline's input: the device's public key,
    the DER form of the assertion's signature and its signing input.
    """
    assertions = []
    raw_checks = []
    for number in range(count):
        key = keys[number % len(keys)]
        response = verifier.issue_challenge(device_id_of(key), ISSUER, "127.0.0.1")
        assertion = build_assertion(
            key,
            Challenge.from_json(response),
            channel_binding=None,
            htm="POST",
            htu=verifier.config.expected_token_url,
        )
        signing_input, _, signature_text = assertion.rpartition(".")
        signature = b64url_decode(signature_text)
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        assertions.append(assertion)
        raw_checks.append((key.public_key(), der, signing_input.encode("ascii")))
    return assertions, raw_checks


def measure(store: str, count: int) -> dict[str, Any]:
    """Time full and raw verifications in alternating rounds of 100, so both see the same load.

    The arm that runs first alternates from round to round. ``ratio`` is the median of the
    per-round ratios, which a burst of load from other processes moves less than the ratio of
    the totals (``ratio_of_totals``).
    """
    algorithm = ec.ECDSA(hashes.SHA256())
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as directory:
        verifier = make_verifier(Path(directory), store)
        try:
            keys = enroll_devices(verifier, DEVICES)
            full_seconds = raw_seconds = 0.0
            round_ratios = []
            for number, start in enumerate(range(0, count, ROUND)):
                if start % CHUNK == 0:
                    assertions, raw_checks = prepare(verifier, keys, min(CHUNK, count - start))
                offset = start % CHUNK
                batch = assertions[offset : offset + ROUND]
                raw_batch = raw_checks[offset : offset + ROUND]
                if number % 2:
                    full_round = time_full(verifier, batch)
                    raw_round = time_raw(raw_batch, algorithm)
                else:
                    raw_round = time_raw(raw_batch, algorithm)
                    full_round = time_full(verifier, batch)
                raw_seconds += raw_round
                full_seconds += full_round
                round_ratios.append(raw_round / full_round)
        finally:
            verifier.close()
    full = count / full_seconds
    raw = count / raw_seconds
    return {
        "store": store,
        "assertions": count,
        "full_verify_per_second": round(full, 1),
        "raw_ecdsa_p256_verify_per_second": round(raw, 1),
        "ratio": round(statistics.median(round_ratios), 3),
        "ratio_of_totals": round(full / raw, 3),
    }


def time_raw(batch: list[RawCheck], algorithm: ec.ECDSA) -> float:
    started = time.perf_counter()
    for public_key, signature, message in batch:
        public_key.verify(signature, message, algorithm)
    return time.perf_counter() - started


def time_full(verifier: Verifier, batch: list[str]) -> float:
    started = time.perf_counter()
    for assertion in batch:
        verifier.verify_assertion(assertion, audience_kind="http", client_address="127.0.0.1")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--count", type=int, default=4000, help="assertions per store (default 4000)"
    )
    parser.add_argument(
        "--store",
        choices=["memory", "sqlite", "both"],
        default="both",
        help="challenge store under test (default both)",
    )
    args = parser.parse_args(argv)

    stores = ["memory", "sqlite"] if args.store == "both" else [args.store]
    results = [measure(store, args.count) for store in stores]
    target_ratios = [result["ratio"] for result in results if result["store"] == TARGET_STORE]
    met = target_ratios[0] >= TARGET_RATIO if target_ratios else None
    report = {
        "benchmark": "verify",
        "python": sys.version.split()[0],
        "target": {
            "store": TARGET_STORE,
            "min_ratio": TARGET_RATIO,
            "met": met,
        },
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for result in results:
            print(
                f"{result['store']:>6}: {result['full_verify_per_second']:.0f} full/s, "
                f"{result['raw_ecdsa_p256_verify_per_second']:.0f} raw/s, "
                f"ratio {result['ratio']:.2f} (median of rounds), "
                f"{result['ratio_of_totals']:.2f} (totals)"
            )
        outcome = "met" if met else "missed"
        if met is None:
            outcome = "not measured"
        print(f"target: ratio >= {TARGET_RATIO:.2f} with the {TARGET_STORE} store: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
