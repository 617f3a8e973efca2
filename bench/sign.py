"""Signs per second through an SDK key and through raw python-pkcs11, same key handle, one run.

Both sides sign a 64-byte message with ECDSA P-256 on one SoftHSM key handle:

- raw: ``hashlib.sha256`` on the host, then python-pkcs11 ``key.sign(digest, mechanism=ECDSA)``,
  which returns raw r||s. This is the least work that signs a message on the token.
- sdk: ``key.sign(message, ec.ECDSA(hashes.SHA256()))`` on the key from ``open_key``, which adds
  the module lock, the fork check and the DER encoding that ``cryptography`` callers expect.

With ``--backend tpm`` the key is a persistent P-256 key in a TPM:

- raw: ``hashlib.sha256``, then tpm2-pytss ``ESAPI.sign`` on the key's ESYS_TR, in a context of
  its own on the same TCTI, which returns a TPMT_SIGNATURE.
- sdk: ``key.sign(message, ec.ECDSA(hashes.SHA256()))`` on the key from ``open_key``, which adds
  the connection lock, the retry wrapper and the DER encoding.

Rounds alternate between the two so that drift on a shared machine hits both. The output is the
median round of each side and the ratio sdk/raw, whose target is at least 0.90.

Usage: ``python bench/sign.py [--json] [--count N] [--rounds R] [--backend softhsm|tpm]
[--uri URI]``. Without ``--uri`` a temporary SoftHSM token store, or a temporary swtpm on a free
loopback port, is created and removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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
        "raw": "python-pkcs11",
        "python_pkcs11": version("python-pkcs11"),
        "cryptography": version("cryptography"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


# --- TPM ----------------------------------------------------------------------------------------

SWTPM_START_TIMEOUT = 10.0  # seconds


@contextlib.contextmanager
def _swtpm_unless(uri: str | None, directory: str) -> Iterator[str]:
    """Yield ``uri``, or start swtpm and yield the URI of a new persistent key in it."""
    if uri is not None:
        yield uri
        return

    from device_sdk.keys import tpm

    port = _free_port_pair()
    state = os.path.join(directory, "swtpm")
    os.mkdir(state)
    process = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2",
            "--server", f"type=tcp,bindaddr=127.0.0.1,port={port}",
            "--ctrl", f"type=tcp,bindaddr=127.0.0.1,port={port + 1}",
            "--flags", "not-need-init,startup-clear", "--tpmstate", f"dir={state}",
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + SWTPM_START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"swtpm did not start on 127.0.0.1:{port}") from None
                time.sleep(0.02)
        uri = f"tpm2:handle=0x81000100?tcti=swtpm:host=127.0.0.1,port={port}"
        tpm.generate_key(uri, "ec-p256")
        yield uri
    finally:
        from device_sdk.keys.tpm_connection import close_connections

        close_connections()
        process.terminate()
        process.wait(timeout=10)


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise SystemExit("no two adjacent free TCP ports on 127.0.0.1")


def run_tpm(uri: str, count: int, rounds: int) -> dict[str, Any]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from tpm2_pytss import ESAPI, TPM2_ALG, TPMT_SIG_SCHEME

    from device_sdk.keys import open_key
    from device_sdk.keys.tpm import resolve_tcti
    from device_sdk.keys.uri import Tpm2URI

    parsed = Tpm2URI.parse(uri)
    if parsed.handle is None:
        raise SystemExit(f"{uri} is not a persistent handle; the benchmark needs tpm2:handle=")
    key = open_key(uri)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SystemExit(f"{key.uri} is not an EC key; the benchmark signs with ECDSA P-256")
    algorithm = ec.ECDSA(hashes.SHA256())

    context = ESAPI(resolve_tcti(parsed.tcti))
    handle = context.tr_from_tpmpublic(parsed.handle)
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256

    def sdk_sign() -> bytes:
        return key.sign(MESSAGE, algorithm)

    def raw_sign() -> Any:
        return context.sign(handle, hashlib.sha256(MESSAGE).digest(), scheme)

    try:
        _rate(sdk_sign, 20)
        _rate(raw_sign, 20)
        sdk_rates, raw_rates = [], []
        for _ in range(rounds):
            raw_rates.append(_rate(raw_sign, count))
            sdk_rates.append(_rate(sdk_sign, count))
    finally:
        context.close()

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
        "raw": "tpm2-pytss",
        "tpm2_pytss": version("tpm2-pytss"),
        "python": platform.python_version(),
        "cryptography": version("cryptography"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--count", type=int, help="signs per round and side (default 3000; 300 with a TPM)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per side")
    parser.add_argument(
        "--uri", help="pkcs11: URI (with its PIN) or tpm2:handle= URI of an existing P-256 key"
    )
    parser.add_argument(
        "--backend", choices=("softhsm", "tpm"), default="softhsm", help="key backend to measure"
    )
    args = parser.parse_args(argv)
    if args.count is None:
        args.count = 300 if args.backend == "tpm" else 3000

    with tempfile.TemporaryDirectory(prefix="bench-sign-") as directory:
        if args.backend == "tpm":
            with _swtpm_unless(args.uri, directory) as uri:
                result = run_tpm(uri, args.count, args.rounds)
        else:
            uri = args.uri or _temporary_key(directory)
            result = run(uri, args.count, args.rounds)

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"sdk {result['sdk_signs_per_second']}/s, raw {result['raw']} "
            f"{result['raw_signs_per_second']}/s, ratio {result['ratio']} "
            f"(target {TARGET_RATIO}) over {args.rounds} rounds of {args.count} signs"
        )
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
