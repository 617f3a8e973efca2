"""Signs per second through an SDK key and through raw python-pkcs11, same key handle, one run.

Both sides sign a 64-byte message with ECDSA P-256 on one SoftHSM key handle:

- raw: ``hashlib.sha256`` on the host, then python-pkcs11 ``key.sign(digest, mechanism=ECDSA)``,
  which returns raw r||s. This is the least work that signs a message on the token.
- sdk: ``key.sign(message, ec.ECDSA(hashes.SHA256()))`` on the key from ``open_key``, which adds
  the module lock, the fork check and the DER encoding that ``cryptography`` callers expect.

Rounds alternate between the two so that drift on a shared machine hits both. The output is the
median round of each side and the ratio sdk/raw, whose target is at least 0.90.

Usage: ``python bench/sign.py [--json] [--count N] [--rounds R] [--uri PKCS11_URI]``. Without
``--uri`` a temporary SoftHSM token store is created and removed afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

TARGET_RATIO = 0.90
MESSAGE = bytes(range(64))


def _rate(sign: Callable[[], Any], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        sign()
    return count / (time.perf_counter() - start)


def _temporary_key(directory: str) -> str:
    from device_sdk.keys import softhsm

    store = softhsm.create_store(os.path.join(directory, "store"))
    os.environ["SOFTHSM2_CONF"] = str(store.conf_path)
    os.environ.pop("SOFTHSM_CONF", None)
    token = softhsm.init_token(store, "bench")
    uri = token.key_uri(label="bench-p256")

    from device_sdk.keys.pkcs11 import generate_key

    generate_key(uri, "ec-p256")
    return uri


def run(uri: str, count: int, rounds: int) -> dict[str, Any]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from pkcs11 import Mechanism

    from device_sdk.keys.pkcs11 import Pkcs11Signer, open_key

    key = open_key(uri)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SystemExit(f"{key.uri} is not an EC key; the benchmark signs with ECDSA P-256")
    signer = key.signer
    assert isinstance(signer, Pkcs11Signer)
    handle = signer.raw_handle()
    algorithm = ec.ECDSA(hashes.SHA256())

    def sdk_sign() -> bytes:
        return key.sign(MESSAGE, algorithm)

    def raw_sign() -> bytes:
        return handle.sign(hashlib.sha256(MESSAGE).digest(), mechanism=Mechanism.ECDSA)  # type: ignore[no-any-return]

    # Warm up both paths (first-call lookups, caches) before timing.
    _rate(sdk_sign, 200)
    _rate(raw_sign, 200)

    sdk_rates, raw_rates = [], []
    for _ in range(rounds):
        raw_rates.append(_rate(raw_sign, count))
        sdk_rates.append(_rate(sdk_sign, count))

    sdk = statistics.median(sdk_rates)
    raw = statistics.median(raw_rates)
    return {
        "benchmark": "sign",
        "key": key.uri,
        "backend": key.backend,
        "algorithm": "ecdsa-p256-sha256",
        "signs_per_round": count,
        "rounds": rounds,
        "sdk_signs_per_second": round(sdk),
        "raw_signs_per_second": round(raw),
        "ratio": round(sdk / raw, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": sdk / raw >= TARGET_RATIO,
        "sdk_rounds": [round(rate) for rate in sdk_rates],
        "raw_rounds": [round(rate) for rate in raw_rates],
        "python": platform.python_version(),
        "python_pkcs11": version("python-pkcs11"),
        "cryptography": version("cryptography"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--count", type=int, default=3000, help="signs per round and side")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per side")
    parser.add_argument("--uri", help="pkcs11: URI of an existing EC P-256 key (with its PIN)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-sign-") as directory:
        uri = args.uri or _temporary_key(directory)
        result = run(uri, args.count, args.rounds)

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"sdk {result['sdk_signs_per_second']}/s, raw python-pkcs11 "
            f"{result['raw_signs_per_second']}/s, ratio {result['ratio']} "
            f"(target {TARGET_RATIO}) over {args.rounds} rounds of {args.count} signs"
        )
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
