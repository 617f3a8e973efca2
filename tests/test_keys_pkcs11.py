"""The PKCS#11 backend against real SoftHSM: signing, threads, fork, token removal, PINs."""

from __future__ import annotations

import datetime
import glob
import logging
import os
import subprocess
import sys
import threading
from typing import Any

import jwt
import pkcs11 as p11
import pkcs11._pkcs11 as p11_core
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID
from fixtures_softhsm import unique_label

from device_sdk.errors import (
    AmbiguousKeyError,
    KeyExistsError,
    KeyExportError,
    KeyNotFoundError,
    KeyPolicyError,
    KeyStoreError,
    PinIncorrectError,
    PinLockedError,
    TokenNotPresentError,
)
from device_sdk.keys import pkcs11 as backend
from device_sdk.keys import pkcs11_session
from device_sdk.keys.base import compute_device_id
from device_sdk.keys.signing import (
    HardwareECKey,
    ecdsa_der_to_raw,
    ecdsa_raw_to_der,
    normalize_ecdsa_signature,
)
from device_sdk.keys.uri import Pkcs11URI

MESSAGE = b"challenge: 5f1c0a3e"
PSS = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH)


def _sign_and_verify(key: Any, message: bytes = MESSAGE) -> None:
    public = key.public_key()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(message)
        public.verify(signature, message)
    else:
        signature = key.sign(message, PSS, hashes.SHA256())
        public.verify(signature, message, PSS, hashes.SHA256())


# --- keys of every algorithm ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "key_class", "size"),
    [
        ("ec-p256", ec.EllipticCurvePrivateKey, 256),
        ("ec-p384", ec.EllipticCurvePrivateKey, 384),
        ("ed25519", ed25519.Ed25519PrivateKey, None),
        ("rsa-pss-2048", rsa.RSAPrivateKey, 2048),
    ],
)
def test_generated_key_signs_and_verifies(softhsm_token, algorithm, key_class, size):
    label = unique_label(algorithm)
    key = backend.generate_key(softhsm_token.key_uri(label=label), algorithm)

    assert isinstance(key, key_class)
    if size is not None:
        assert key.key_size == size
    assert key.backend == "softhsm"
    assert key.hardware_backed is False
    assert key.device_id == compute_device_id(key.public_key())
    assert Pkcs11URI.parse(key.uri).object == label
    _sign_and_verify(key)

    # The same key opened again by label alone has the same identity.
    reopened = backend.open_key(softhsm_token.key_uri(label=label))
    assert reopened.device_id == key.device_id
    _sign_and_verify(reopened)


@pytest.mark.parametrize("algorithm", ["ec-p256", "ed25519", "rsa-pss-2048"])
def test_export_methods_raise_naming_token(softhsm_token, algorithm):
    key = backend.generate_key(softhsm_token.key_uri(label=unique_label()), algorithm)

    with pytest.raises(KeyExportError, match="PKCS#11 token 'sdk-test'"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        with pytest.raises(KeyExportError, match="sdk-test"):
            key.private_bytes_raw()
    else:
        with pytest.raises(KeyExportError, match="sdk-test"):
            key.private_numbers()


def test_generated_key_policy_read_back(softhsm_key_uri):
    key = backend.open_key(softhsm_key_uri)

    policy = backend.key_policy(key)

    assert policy == {
        "never_extractable": True,
        "always_sensitive": True,
        "extractable": False,
        "sensitive": True,
        "local": True,
    }


def test_rsa_pkcs1v15_and_prehashed_pss(softhsm_token):
    key = backend.generate_key(softhsm_token.key_uri(label=unique_label()), "rsa-pss-2048")
    public = key.public_key()

    signature = key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA384())
    public.verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA384())

    digest = hashes.Hash(hashes.SHA256())
    digest.update(MESSAGE)
    prehashed = Prehashed(hashes.SHA256())
    pss_digest = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    signature = key.sign(digest.finalize(), pss_digest, prehashed)
    public.verify(signature, MESSAGE, pss_digest, hashes.SHA256())


def test_ecdsa_sha384_and_prehashed(softhsm_key_uri):
    key = backend.open_key(softhsm_key_uri)
    public = key.public_key()

    signature = key.sign(MESSAGE, ec.ECDSA(hashes.SHA384()))
    public.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA384()))

    digest = hashes.Hash(hashes.SHA256())
    digest.update(MESSAGE)
    signature = key.sign(digest.finalize(), ec.ECDSA(Prehashed(hashes.SHA256())))
    public.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))


# --- cryptography and PyJWT use the key unchanged ---------------------------------------------


def test_csr_builder_signs_on_token(softhsm_key_uri):
    key = backend.open_key(softhsm_key_uri)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key.device_id)])

    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())

    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    assert csr.subject == subject


def test_pyjwt_es256_signs_on_token(softhsm_key_uri):
    key = backend.open_key(softhsm_key_uri)

    token = jwt.encode({"sub": key.device_id, "nonce": "abc"}, key, algorithm="ES256")
    claims = jwt.decode(token, key.public_key(), algorithms=["ES256"])

    assert claims == {"sub": key.device_id, "nonce": "abc"}
    assert jwt.get_unverified_header(token)["alg"] == "ES256"


# --- concurrency, fork, token removal ---------------------------------------------------------


def test_eight_threads_sign_1600_times(softhsm_key_uri):
    key = backend.open_key(softhsm_key_uri)
    public = key.public_key()
    results: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []
    results_lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        start.wait()
        try:
            for count in range(200):
                message = f"thread {index} message {count}".encode()
                signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
                with results_lock:
                    results.append((message, signature))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert len(results) == 1600
    for message, signature in results:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


def test_forked_child_signs_and_parent_still_signs(softhsm_key_uri):
    key = backend.open_key(softhsm_key_uri)
    public = key.public_key()
    public.verify(key.sign(b"parent before", ec.ECDSA(hashes.SHA256())), b"parent before",
                  ec.ECDSA(hashes.SHA256()))
    read_end, write_end = os.pipe()

    pid = os.fork()
    if pid == 0:  # child: sign, hand the signature to the parent, exit without pytest cleanup
        status = 1
        try:
            os.close(read_end)
            signature = key.sign(b"child", ec.ECDSA(hashes.SHA256()))
            os.write(write_end, signature)
            status = 0
        finally:
            os._exit(status)

    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_signature = pipe.read()
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    public.verify(child_signature, b"child", ec.ECDSA(hashes.SHA256()))
    after = key.sign(b"parent after", ec.ECDSA(hashes.SHA256()))
    public.verify(after, b"parent after", ec.ECDSA(hashes.SHA256()))


class _RemovalInjector:
    """Replace python-pkcs11's C_Sign wrapper so the next ``failures`` calls see a removed token."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failures: int) -> None:
        self.failures = failures
        self.sign_calls = 0
        self.slot_lists = 0
        original_sign = p11_core.SignMixin._sign
        original_get_slots = p11_core.lib.get_slots

        def sign(obj: Any, *args: Any, **kwargs: Any) -> bytes:
            self.sign_calls += 1
            if self.failures > 0:
                self.failures -= 1
                raise p11.exceptions.DeviceRemoved()
            return original_sign(obj, *args, **kwargs)

        monkeypatch.setattr(p11_core.SignMixin, "_sign", sign)
        self._original_get_slots = original_get_slots

    def count_slot_lists(self, module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        # lib is a Cython type, so count through the module object that calls it.
        original_lib = module.lib
        injector = self

        class CountingLib:
            def __getattr__(self, name: str) -> Any:
                return getattr(original_lib, name)

            def get_slots(self, *args: Any, **kwargs: Any) -> Any:
                injector.slot_lists += 1
                return original_lib.get_slots(*args, **kwargs)

        monkeypatch.setattr(module, "lib", CountingLib())


def test_token_removal_recovers_once(softhsm_key_uri, monkeypatch, caplog):
    key = backend.open_key(softhsm_key_uri)
    key.sign(b"warm up", ec.ECDSA(hashes.SHA256()))
    injector = _RemovalInjector(monkeypatch, failures=1)
    injector.count_slot_lists(key.signer._module, monkeypatch)
    caplog.set_level(logging.WARNING, logger="device_sdk.keys.pkcs11_session")

    signature = key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))

    key.public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    assert injector.sign_calls == 2
    assert injector.slot_lists == 1  # the token was looked up again, by serial and label
    recoveries = [r for r in caplog.records if "finding the token again" in r.getMessage()]
    assert len(recoveries) == 1
    assert "CKR_DEVICE_REMOVED" in recoveries[0].getMessage()


def test_token_removal_twice_raises_not_present(softhsm_key_uri, monkeypatch):
    key = backend.open_key(softhsm_key_uri)
    key.sign(b"warm up", ec.ECDSA(hashes.SHA256()))
    injector = _RemovalInjector(monkeypatch, failures=10)

    with pytest.raises(TokenNotPresentError) as caught:
        key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))

    assert injector.sign_calls == 2
    assert caught.value.rv == 0x32
    assert caught.value.token == "sdk-test"
    assert str(caught.value).startswith(
        "C_Sign on token 'sdk-test': CKR_DEVICE_REMOVED (0x32): the token is still unavailable"
    )

    monkeypatch.undo()
    signature = key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))


def test_removed_token_not_found_again(softhsm_key_uri, monkeypatch):
    key = backend.open_key(softhsm_key_uri)
    key.sign(b"warm up", ec.ECDSA(hashes.SHA256()))
    _RemovalInjector(monkeypatch, failures=1)
    module = key.signer._module
    original_lib = module.lib

    class NoTokenLib:
        def __getattr__(self, name: str) -> Any:
            return getattr(original_lib, name)

        def get_slots(self, *args: Any, **kwargs: Any) -> list[Any]:
            return []

    monkeypatch.setattr(module, "lib", NoTokenLib())

    with pytest.raises(TokenNotPresentError, match="no token matches token=sdk-test;serial="):
        key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))


# --- PINs -------------------------------------------------------------------------------------

SPY_SCRIPT = """
import sys
from device_sdk.errors import PinIncorrectError
from device_sdk.keys.pkcs11 import open_key
outcomes = []
for attempt in range(2):
    try:
        open_key(sys.argv[1])
        outcomes.append("opened")
    except PinIncorrectError as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")
print("\\n".join(outcomes))
"""

# OpenSC's pkcs11-spy logs every PKCS#11 call it forwards to the module named by PKCS11SPY.
SPY_CANDIDATES = sorted(glob.glob("/usr/lib/*/pkcs11/pkcs11-spy.so")) + sorted(
    glob.glob("/usr/lib*/pkcs11/pkcs11-spy.so")
)


def test_wrong_pin_sent_to_token_once(softhsm_new_token, softhsm_env, tmp_path):
    if not SPY_CANDIDATES:
        pytest.skip("OpenSC's pkcs11-spy.so is missing; install it with: apt install opensc")
    spy_library = SPY_CANDIDATES[0]
    token = softhsm_new_token()
    backend.generate_key(token.key_uri(label="k"), "ec-p256")
    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("000000")
    wrong_pin.chmod(0o600)
    spy_log = tmp_path / "spy.log"
    uri = str(
        Pkcs11URI.parse(token.key_uri(label="k")).with_attributes(
            module_path=spy_library, pin_source=f"file:{wrong_pin}"
        )
    )
    env = {**softhsm_env, "PKCS11SPY": token.module_path, "PKCS11SPY_OUTPUT": str(spy_log)}

    completed = subprocess.run(
        [sys.executable, "-c", SPY_SCRIPT, uri], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )

    assert completed.returncode == 0, completed.stderr
    first, second = completed.stdout.strip().splitlines()
    assert first.startswith("PinIncorrectError: C_Login on token")
    assert "CKR_PIN_INCORRECT (0xA0): wrong PIN; not retried" in first
    assert "rejected before in this process and is not tried again" in second
    calls = [line for line in spy_log.read_text().splitlines() if "C_Login" in line]
    assert len(calls) == 1


def test_wrong_pin_raises_incorrect_in_process(softhsm_new_token, tmp_path):
    token = softhsm_new_token()
    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("999999")
    wrong_pin.chmod(0o600)
    uri = Pkcs11URI.parse(token.key_uri(label="k")).with_attributes(
        pin_source=f"file:{wrong_pin}"
    )

    with pytest.raises(PinIncorrectError) as caught:
        backend.open_key(uri)

    assert caught.value.rv == 0xA0
    assert caught.value.rv_name == "CKR_PIN_INCORRECT"
    assert "999999" not in str(caught.value)


class _FakeToken:
    def __init__(self, flags: int) -> None:
        self.label = "fake"
        self.slot = self
        self._flags = flags

    def get_token(self) -> Any:
        return type("Info", (), {"flags": self._flags})()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (p11.TokenFlag.USER_PIN_LOCKED, "the user PIN is locked"),
        (p11.TokenFlag.USER_PIN_FINAL_TRY, "one more wrong PIN locks the token"),
    ],
)
def test_pin_flags_stop_unattended_login(flag, message):
    with pytest.raises(PinLockedError, match=message):
        pkcs11_session.check_pin_flags(_FakeToken(int(flag)))


def test_pin_count_low_only_warns(caplog):
    caplog.set_level(logging.WARNING)

    pkcs11_session.check_pin_flags(_FakeToken(int(p11.TokenFlag.USER_PIN_COUNT_LOW)))

    assert ["CKF_USER_PIN_COUNT_LOW" in r.getMessage() for r in caplog.records] == [True]


def test_login_by_another_caller_tolerated(softhsm_new_token, softhsm_env):
    token = softhsm_new_token()
    backend.generate_key(token.key_uri(label="k"), "ec-p256")
    script = (
        "import sys, pkcs11\n"
        "from pathlib import Path\n"
        "from cryptography.hazmat.primitives import hashes\n"
        "from cryptography.hazmat.primitives.asymmetric import ec\n"
        "from device_sdk.keys.pkcs11 import open_key\n"
        "lib = pkcs11.lib(sys.argv[2])\n"
        "pin = Path(sys.argv[4]).read_text()\n"
        "raw = lib.get_token(token_label=sys.argv[3]).open(user_pin=pin)\n"
        "key = open_key(sys.argv[1])\n"
        "key.public_key().verify(key.sign(b'm', ec.ECDSA(hashes.SHA256())), b'm',"
        " ec.ECDSA(hashes.SHA256()))\n"
        "print('signed')\n"
    )
    args = [token.key_uri(label="k"), token.module_path, token.label, str(token.user_pin_file)]

    completed = subprocess.run(
        [sys.executable, "-c", script, *args], env=softhsm_env, capture_output=True, text=True,
        timeout=60, check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "signed"


# --- lookup, ambiguity, generation policy -----------------------------------------------------


def _raw_session(token: Any) -> Any:
    lib = p11.lib(token.module_path)
    return lib.get_token(token_label=token.label).open(rw=True)


def test_two_keys_same_label_ambiguous(softhsm_token, softhsm_key_uri):
    backend.open_key(softhsm_key_uri)  # logs this process in, so the raw session may write keys
    label = unique_label("twin")
    session = _raw_session(softhsm_token)
    params = bytes.fromhex("06082a8648ce3d030107")
    for key_id in (b"\x01\x11", b"\x02\x22"):
        session.generate_keypair(
            p11.KeyType.EC, store=True, id=key_id, label=label,
            public_template={p11.Attribute.EC_PARAMS: params},
        )
    session.close()

    with pytest.raises(AmbiguousKeyError) as caught:
        backend.open_key(softhsm_token.key_uri(label=label))

    message = str(caught.value)
    assert "2 private keys match" in message
    assert "id=0111" in message
    assert "id=0222" in message

    picked = backend.open_key(softhsm_token.key_uri(label=label, key_id=b"\x02\x22"))
    _sign_and_verify(picked)


def test_extractable_key_rejected_on_open(softhsm_token, softhsm_key_uri):
    backend.open_key(softhsm_key_uri)  # logs this process in, so the raw session may write keys
    label = unique_label("exportable")
    session = _raw_session(softhsm_token)
    session.generate_keypair(
        p11.KeyType.EC, store=True, id=b"\x0e\x0e", label=label,
        public_template={p11.Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")},
        private_template={p11.Attribute.EXTRACTABLE: True, p11.Attribute.SENSITIVE: False},
    )
    session.close()

    with pytest.raises(KeyPolicyError) as caught:
        backend.open_key(softhsm_token.key_uri(label=label))

    assert "can be exported (CKA_EXTRACTABLE=True, CKA_SENSITIVE=False)" in str(caught.value)


def test_always_authenticate_key_signs(softhsm_token, softhsm_key_uri):
    backend.open_key(softhsm_key_uri)  # logs this process in, so the raw session may write keys
    label = unique_label("always-auth")
    session = _raw_session(softhsm_token)
    session.generate_keypair(
        p11.KeyType.EC, store=True, id=b"\x0a\x0a", label=label,
        public_template={p11.Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")},
        private_template={p11.Attribute.ALWAYS_AUTHENTICATE: True},
    )
    session.close()

    key = backend.open_key(softhsm_token.key_uri(label=label))

    for _ in range(3):
        _sign_and_verify(key)



def test_always_authenticate_wrong_pin_not_sent_again(softhsm_new_token, tmp_path):
    # Each signature with a CKA_ALWAYS_AUTHENTICATE key sends the PIN (context-specific
    # C_Login), read again from the pin-source. A wrong PIN there must be remembered like one
    # at login, not sent with every signature until the token locks.
    token = softhsm_new_token()
    backend.generate_key(token.key_uri(label="k"), "ec-p256")  # logs this process in
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.user_pin_file.read_text())
    pin_file.chmod(0o600)
    uri = Pkcs11URI.parse(token.key_uri(label="always")).with_attributes(
        pin_source=f"file:{pin_file}"
    )
    session = _raw_session(token)
    session.generate_keypair(
        p11.KeyType.EC, store=True, id=b"\x0b\x0b", label="always",
        public_template={p11.Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")},
        private_template={p11.Attribute.ALWAYS_AUTHENTICATE: True},
    )
    session.close()
    key = backend.open_key(str(uri))
    _sign_and_verify(key)

    pin_file.write_text("999999")
    with pytest.raises(PinIncorrectError) as first:
        key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(PinIncorrectError) as second:
        key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))

    assert first.value.rv_name == "CKR_PIN_INCORRECT"
    assert "rejected before in this process and is not tried again" in str(second.value)
    assert "999999" not in str(first.value) + str(second.value)


def test_generate_with_used_label_rejected(softhsm_token):
    label = unique_label("used")
    backend.generate_key(softhsm_token.key_uri(label=label), "ec-p256")

    with pytest.raises(KeyExistsError, match=f"already has an object with label '{label}'"):
        backend.generate_key(softhsm_token.key_uri(label=label), "ec-p384")
    with pytest.raises(KeyExistsError):
        backend.generate_key(softhsm_token.key_uri(label=label), "ed25519")


def test_generate_with_used_id_rejected(softhsm_token):
    key_id = os.urandom(8)
    backend.generate_key(softhsm_token.key_uri(label=unique_label(), key_id=key_id), "ec-p256")

    with pytest.raises(KeyExistsError, match=f"or id {key_id.hex()}"):
        backend.generate_key(softhsm_token.key_uri(label=unique_label(), key_id=key_id), "ec-p256")


def test_missing_key_not_found(softhsm_token):
    with pytest.raises(KeyNotFoundError, match="no private key matches object=absent"):
        backend.open_key(softhsm_token.key_uri(label="absent"))


def test_softhsm_key_logs_one_warning(softhsm_key_uri, caplog):
    caplog.set_level(logging.WARNING, logger="device_sdk.keys")

    key = backend.open_key(softhsm_key_uri)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "SoftHSM, a software token" in warnings[0].getMessage()
    assert key.hardware_backed is False


# --- certificates on the token ----------------------------------------------------------------


def _self_signed(key: Any) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_certificate_store_is_idempotent(softhsm_key_uri):
    key = backend.open_key(softhsm_key_uri)
    certificate = _self_signed(key)
    der = certificate.public_bytes(serialization.Encoding.DER)

    assert backend.find_certificate(softhsm_key_uri) is None
    assert backend.store_certificate(softhsm_key_uri, der) is True
    assert backend.store_certificate(softhsm_key_uri, der) is False
    assert backend.find_certificate(softhsm_key_uri) == certificate

    newer = _self_signed(key)
    newer_der = newer.public_bytes(serialization.Encoding.DER)
    with pytest.raises(KeyExistsError, match="different certificate"):
        backend.store_certificate(softhsm_key_uri, newer_der)
    assert backend.store_certificate(softhsm_key_uri, newer_der, replace=True) is True
    assert backend.find_certificate(softhsm_key_uri) == newer


def test_certificate_of_other_key_rejected(softhsm_key_uri):
    other = ec.generate_private_key(ec.SECP256R1())
    der = _self_signed(other).public_bytes(serialization.Encoding.DER)

    with pytest.raises(KeyStoreError, match="does not hold the public key"):
        backend.store_certificate(softhsm_key_uri, der)


# --- encodings: EC points and ECDSA signatures ------------------------------------------------


def _p256_point() -> tuple[ec.EllipticCurvePublicKey, bytes]:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return public, point


def test_ec_point_der_and_raw_forms():
    public, point = _p256_point()

    assert len(point) == 65
    assert pkcs11_session.decode_ec_point(point, ec.SECP256R1()) == public
    assert pkcs11_session.decode_ec_point(b"\x04\x41" + point, ec.SECP256R1()) == public


def test_ec_point_wrong_length_rejected():
    _, point = _p256_point()

    with pytest.raises(ValueError, match="not a secp256r1 point"):
        pkcs11_session.decode_ec_point(b"\x04\x42" + point + b"\x00", ec.SECP256R1())


def test_ed25519_point_with_and_without_prefix():
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    assert pkcs11_session.decode_ed25519_point(raw) == public
    assert pkcs11_session.decode_ed25519_point(b"\x04\x20" + raw) == public
    with pytest.raises(ValueError, match="not a DER OCTET STRING"):
        pkcs11_session.decode_ed25519_point(b"\x03\x20" + raw)


def test_raw_der_round_trip_keeps_width():
    signature = encode_dss_signature(1, 2**255 + 7)

    raw = ecdsa_der_to_raw(signature, ec.SECP256R1())

    assert raw == (1).to_bytes(32, "big") + (2**255 + 7).to_bytes(32, "big")
    assert ecdsa_raw_to_der(raw) == signature


def test_raw_signature_with_zero_rejected():
    with pytest.raises(ValueError, match="r or s equal to zero"):
        ecdsa_raw_to_der(bytes(64))


def _prehashed_signature(private: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(MESSAGE)
    value = digest.finalize()
    return value, private.sign(value, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_token_der_signature_checked_and_kept():
    private = ec.generate_private_key(ec.SECP256R1())
    digest, der = _prehashed_signature(private)
    while len(der) == 64:  # a 64-byte DER signature is read as raw r||s, so draw another
        digest, der = _prehashed_signature(private)

    result, was_der = normalize_ecdsa_signature(der, private.public_key(), digest, "token 'x'")

    assert (result, was_der) == (der, True)


def test_token_der_signature_not_verifying_rejected():
    private = ec.generate_private_key(ec.SECP256R1())
    digest, der = _prehashed_signature(private)
    r, s = decode_dss_signature(der)
    forged = encode_dss_signature(r, s ^ 1)

    with pytest.raises(KeyStoreError, match="does not verify with its public key"):
        normalize_ecdsa_signature(forged, private.public_key(), digest, "token 'x'")


def test_token_garbage_signature_rejected():
    private = ec.generate_private_key(ec.SECP256R1())
    digest, der = _prehashed_signature(private)

    expected = "neither raw r\\|\\|s \\(64 bytes\\) nor canonical DER"
    with pytest.raises(KeyStoreError, match=expected):
        normalize_ecdsa_signature(der + b"\x00", private.public_key(), digest, "token 'x'")


def test_token_returning_der_normalised_by_key():
    """A signer that returns DER (as some tokens do) still yields valid DER from ``sign``."""
    private = ec.generate_private_key(ec.SECP256R1())

    class DerSigner:
        location = "token 'der'"

        def sign_ecdsa_digest(self, digest: bytes) -> bytes:
            return private.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    key = HardwareECKey(
        DerSigner(), private.public_key(), uri="pkcs11:token=der", backend="pkcs11",
        hardware_backed=True,
    )
    for count in range(20):
        message = f"m{count}".encode()
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
        private.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))


def test_tampered_signature_fails_verification(softhsm_key_uri):
    key = backend.open_key(softhsm_key_uri)
    signature = key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))

    with pytest.raises(InvalidSignature):
        key.public_key().verify(signature, MESSAGE + b"!", ec.ECDSA(hashes.SHA256()))
