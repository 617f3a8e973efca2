"""Verifier throughput against raw ECDSA P-256 verification, measured in one run.

The full path is :meth:`Verifier.verify_assertion` on fresh ES256 assertions: strict parsing,
header and claim checks, the registry lookup (SQLite), the atomic nonce consume and the signature
check. The baseline is ``cryptography``'s ECDSA P-256 ``verify`` on one DER signature over a
message of the same length. Challenges and assertions are prepared before the clock starts.

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
from cryptography.x509.oid import NameOID

from device_sdk.auth import Challenge, build_assertion, device_id_of
from device_sdk.verifier import (
    ChallengeStore,
    MemoryChallengeStore,
    SQLiteChallengeStore,
    SQLiteDeviceRegistry,
    Verifier,
    VerifierConfig,
)

ISSUER = "http://127.0.0.1:8080"
DEVICES = 50


ROUND = 100


def make_raw_baseline(message_length: int) -> tuple[Any, bytes, bytes, ec.ECDSA]:
    key = ec.generate_private_key(ec.SECP256R1())
    message = b"x" * message_length
    algorithm = ec.ECDSA(hashes.SHA256())
    return key.public_key(), key.sign(message, algorithm), message, algorithm


def make_verifier(directory: Path, store: str) -> Verifier:
    # Challenge issue limits are off so one run can prepare thousands of challenges; the
    # failure limit stays on because it is read on every verification.
    config = VerifierConfig(
        issuer=ISSUER, challenge_limit_per_device=None, challenge_limit_per_address=None
    )
    challenges: ChallengeStore
    if store == "sqlite":
        challenges = SQLiteChallengeStore(directory / "verifier.db")
    else:
        challenges = MemoryChallengeStore()
    return Verifier(
        config, registry=SQLiteDeviceRegistry(directory / "verifier.db"), challenges=challenges
    )


def prepare(verifier: Verifier, count: int) -> list[str]:
    """Enroll devices and sign ``count`` HTTP login assertions, one fresh challenge each."""
    keys = []
    for _ in range(DEVICES):
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

    assertions = []
    for number in range(count):
        key = keys[number % DEVICES]
        answer = verifier.issue_challenge(device_id_of(key), ISSUER, "127.0.0.1")
        assertions.append(
            build_assertion(
                key,
                Challenge.from_json(answer),
                channel_binding=None,
                htm="POST",
                htu=verifier.config.expected_token_url,
            )
        )
    return assertions


def measure(store: str, count: int) -> dict[str, Any]:
    """Time full and raw verifications in alternating rounds of 100, so both see the same load.

    ``ratio`` is the median of the per-round ratios, which a burst of load from other processes
    moves less than the ratio of the totals (``ratio_of_totals``).
    """
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as directory:
        verifier = make_verifier(Path(directory), store)
        try:
            assertions = prepare(verifier, count)
            public_key, signature, message, algorithm = make_raw_baseline(
                len(assertions[0].rsplit(".", 1)[0])
            )
            full_seconds = raw_seconds = 0.0
            round_ratios = []
            for start in range(0, count, ROUND):
                batch = assertions[start : start + ROUND]
                started = time.perf_counter()
                for _ in batch:
                    public_key.verify(signature, message, algorithm)
                raw_round = time.perf_counter() - started

                started = time.perf_counter()
                for assertion in batch:
                    verifier.verify_assertion(
                        assertion, audience_kind="http", client_address="127.0.0.1"
                    )
                full_round = time.perf_counter() - started

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
    report = {"benchmark": "verify", "python": sys.version.split()[0], "results": results}
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
