"""The TPM 2.0 key backend against swtpm: generate, persist, reopen, sign, and error mapping."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.x509.oid import NameOID
from fixtures_tpm import Swtpm, require_tpm_stack

from device_sdk.errors import (
    ConfigError,
    KeyExistsError,
    KeyExportError,
    KeyNotFoundError,
    KeyPolicyError,
    TPMError,
    TPMLockoutError,
)
from device_sdk.keys import compute_device_id, open_key

try:
    from tpm2_pytss import (
        ESAPI,
        ESYS_TR,
        TPM2_ALG,
        TPM2_CAP,
        TPM2_HC,
        TPM2_PT,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMA_OBJECT,
        TPMT_SIG_SCHEME,
        TSS2_Exception,
    )

    from device_sdk.keys import tpm, tpm_connection
except ImportError:
    # The autouse fixture below skips every test, with the install command as the reason.
    pass

ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@pytest.fixture(autouse=True)
def _tpm_stack() -> None:
    require_tpm_stack()


def transient_handles(swtpm: Swtpm) -> int:
    """Count the transient objects loaded in the simulator."""
    context = tpm_connection.connection_for(swtpm.tcti).context
    _, data = context.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 10)
    return int(data.data.handles.count)


@pytest.fixture(params=["handle", "path"])
def key_uri(request: pytest.FixtureRequest, swtpm: Swtpm, tmp_path: Path) -> str:
    """A fresh key URI of each kind: a persistent handle and a TSS2 PEM blob."""
    if request.param == "handle":
        return swtpm.handle_uri()
    return swtpm.path_uri(tmp_path / "device.tss2.pem")


# --- generate, open, sign ---------------------------------------------------------------------


def test_generate_key_identity(key_uri: str) -> None:
    key = tpm.generate_key(key_uri, "ec-p256")

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.backend == "tpm"
    assert key.hardware_backed is True
    assert key.uri == key_uri
    assert key.device_id == compute_device_id(key.public_key())


def test_open_key_dispatches_tpm2_scheme(key_uri: str) -> None:
    generated = tpm.generate_key(key_uri, "ec-p256")

    opened = open_key(key_uri)

    assert opened.backend == "tpm"
    assert opened.device_id == generated.device_id


def test_200_signatures_verify(key_uri: str) -> None:
    key = tpm.generate_key(key_uri, "ec-p256")
    public_key = key.public_key()

    for index in range(200):
        message = f"challenge {index}".encode()
        signature = key.sign(message, ECDSA_SHA256)
        public_key.verify(signature, message, ECDSA_SHA256)


def test_signature_is_canonical_der(swtpm: Swtpm) -> None:
    key = tpm.generate_key(swtpm.handle_uri(), "ec-p256")

    for index in range(50):
        signature = key.sign(b"%d" % index, ECDSA_SHA256)
        r, s = decode_dss_signature(signature)
        assert 0 < r < 2**256
        assert 0 < s < 2**256
        assert signature[0] == 0x30


def test_prehashed_sha384_digest_signs(swtpm: Swtpm) -> None:
    key = tpm.generate_key(swtpm.handle_uri(), "ec-p256")
    digest = bytes(range(48))
    algorithm = ec.ECDSA(Prehashed(hashes.SHA384()))

    signature = key.sign(digest, algorithm)

    key.public_key().verify(signature, digest, algorithm)


def test_p384_key_signs(swtpm: Swtpm) -> None:
    key = tpm.generate_key(swtpm.handle_uri(), "ec-p384")
    algorithm = ec.ECDSA(hashes.SHA384())

    signature = key.sign(b"p384", algorithm)

    assert isinstance(key.curve, ec.SECP384R1)
    key.public_key().verify(signature, b"p384", algorithm)


def test_blob_file_is_private_tss2_pem(swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "key.tss2.pem"

    tpm.generate_key(swtpm.path_uri(path), "ec-p256")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")
    assert [p.name for p in tmp_path.iterdir()] == ["key.tss2.pem"]


_CHILD = """
import json, sys
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from device_sdk.keys import open_key
key = open_key(sys.argv[1])
signature = key.sign(b"from another process", ec.ECDSA(hashes.SHA256()))
print(json.dumps({"device_id": key.device_id, "signature": signature.hex()}))
"""


def test_reopen_in_new_process(key_uri: str, swtpm: Swtpm) -> None:
    key = tpm.generate_key(key_uri, "ec-p256")

    result = subprocess.run(
        [sys.executable, "-c", _CHILD, key_uri],
        capture_output=True,
        text=True,
        timeout=60,
        env=swtpm.environment(),
    )

    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["device_id"] == key.device_id
    key.public_key().verify(
        bytes.fromhex(output["signature"]), b"from another process", ECDSA_SHA256
    )


def test_tcti_from_environment(swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch) -> None:
    handle_uri = swtpm.handle_uri()
    key = tpm.generate_key(handle_uri, "ec-p256")
    monkeypatch.setenv("TPM2TOOLS_TCTI", swtpm.tcti)

    opened = open_key(handle_uri.partition("?")[0])

    assert opened.device_id == key.device_id
    assert opened.uri == handle_uri.partition("?")[0]


def test_resolve_tcti_order(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in tpm_connection.TCTI_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert tpm.resolve_tcti(None) == "device:/dev/tpmrm0"

    monkeypatch.setenv("TCTI", "swtpm:port=3")
    assert tpm.resolve_tcti(None) == "swtpm:port=3"

    monkeypatch.setenv("TSS2_TCTI", "swtpm:port=2")
    assert tpm.resolve_tcti(None) == "swtpm:port=2"

    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:port=1")
    assert tpm.resolve_tcti(None) == "swtpm:port=1"
    assert tpm.resolve_tcti("mssim:port=9") == "mssim:port=9"


# --- the key works where a cryptography key does ----------------------------------------------


def test_csr_signed_in_tpm(swtpm: Swtpm) -> None:
    key = tpm.generate_key(swtpm.handle_uri(), "ec-p256")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key.device_id)])

    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())

    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()


def test_pyjwt_es256(swtpm: Swtpm) -> None:
    key = tpm.generate_key(swtpm.handle_uri(), "ec-p256")

    token = jwt.encode({"sub": key.device_id}, key, algorithm="ES256", headers={"kid": "k1"})
    claims = jwt.decode(token, key.public_key(), algorithms=["ES256"])

    assert claims == {"sub": key.device_id}


def test_rsa_pss_2048_key(swtpm: Swtpm, tmp_path: Path) -> None:
    key = tpm.generate_key(swtpm.path_uri(tmp_path / "rsa.tss2.pem"), "rsa-pss-2048")
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)

    signature = key.sign(b"rsa", pss, hashes.SHA256())
    token = jwt.encode({"sub": "d"}, key, algorithm="PS256")

    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    key.public_key().verify(signature, b"rsa", pss, hashes.SHA256())
    assert jwt.decode(token, key.public_key(), algorithms=["PS256"]) == {"sub": "d"}


def test_rsa_pss_other_salt_rejected(swtpm: Swtpm, tmp_path: Path) -> None:
    key = tpm.generate_key(swtpm.path_uri(tmp_path / "rsa.tss2.pem"), "rsa-pss-2048")
    pss_max = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH)

    with pytest.raises(UnsupportedAlgorithm, match="salt as long as the digest"):
        key.sign(b"rsa", pss_max, hashes.SHA256())


def test_export_raises(swtpm: Swtpm) -> None:
    key = tpm.generate_key(swtpm.handle_uri(), "ec-p256")

    with pytest.raises(KeyExportError, match="TPM key handle 0x"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(KeyExportError):
        key.private_numbers()


# --- object slots, threads --------------------------------------------------------------------


def test_sequential_operations_leave_no_transient_objects(swtpm: Swtpm, tmp_path: Path) -> None:
    # swtpm has three object slots: anything left loaded would fail the fourth key.
    keys = [tpm.generate_key(swtpm.path_uri(tmp_path / f"k{i}.pem"), "ec-p256") for i in range(5)]
    keys.append(tpm.generate_key(swtpm.handle_uri(), "ec-p256"))
    keys.extend(open_key(swtpm.path_uri(tmp_path / f"k{i}.pem")) for i in range(5))

    for round_number in range(20):
        for key in keys:
            message = b"round %d" % round_number
            key.public_key().verify(key.sign(message, ECDSA_SHA256), message, ECDSA_SHA256)

    assert transient_handles(swtpm) == 0


def test_failed_sign_leaves_no_transient_objects(swtpm: Swtpm, tmp_path: Path) -> None:
    key = tpm.generate_key(swtpm.path_uri(tmp_path / "k.pem"), "ec-p256")

    with pytest.raises(UnsupportedAlgorithm, match="digest has no TPM hash"):
        key.sign(b"x" * 20, ec.ECDSA(Prehashed(hashes.SHA1())))
    for _ in range(5):
        key.sign(b"still works", ECDSA_SHA256)

    assert transient_handles(swtpm) == 0


def test_eight_threads_sign_at_once(swtpm: Swtpm, tmp_path: Path) -> None:
    keys = [
        tpm.generate_key(swtpm.handle_uri(), "ec-p256"),
        tpm.generate_key(swtpm.path_uri(tmp_path / "k.pem"), "ec-p256"),
    ]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        key = keys[index % 2]
        try:
            for count in range(25):
                message = b"%d-%d" % (index, count)
                key.public_key().verify(key.sign(message, ECDSA_SHA256), message, ECDSA_SHA256)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert transient_handles(swtpm) == 0


# --- errors -----------------------------------------------------------------------------------


def test_empty_handle_not_found(swtpm: Swtpm) -> None:
    with pytest.raises(
        KeyNotFoundError, match=r"not found: persistent handle 0x[0-9a-f]{8} is empty"
    ):
        open_key(swtpm.handle_uri())


def test_missing_blob_not_found(swtpm: Swtpm, tmp_path: Path) -> None:
    with pytest.raises(KeyNotFoundError, match="does not exist"):
        open_key(swtpm.path_uri(tmp_path / "missing.pem"))


def test_not_a_blob_rejected(swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "other.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n")

    with pytest.raises(ConfigError, match="is not a TSS2 PEM key blob"):
        open_key(swtpm.path_uri(path))


def test_generate_on_taken_handle_raises(swtpm: Swtpm) -> None:
    uri = swtpm.handle_uri()
    first = tpm.generate_key(uri, "ec-p256")

    with pytest.raises(KeyExistsError, match="is already in use"):
        tpm.generate_key(uri, "ec-p256")
    assert open_key(uri).device_id == first.device_id


def test_generate_on_existing_file_raises(swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    tpm.generate_key(swtpm.path_uri(path), "ec-p256")
    before = path.read_bytes()

    with pytest.raises(KeyExistsError, match="already exists"):
        tpm.generate_key(swtpm.path_uri(path), "ec-p256")
    assert path.read_bytes() == before


def test_unknown_algorithm_rejected(swtpm: Swtpm) -> None:
    with pytest.raises(ConfigError, match="cannot create 'ed25519' keys"):
        tpm.generate_key(swtpm.handle_uri(), "ed25519")


def test_delete_key_evicts(swtpm: Swtpm) -> None:
    uri = swtpm.handle_uri()
    tpm.generate_key(uri, "ec-p256")

    tpm.delete_key(uri)

    with pytest.raises(KeyNotFoundError):
        open_key(uri)


def _persist_raw_key(
    swtpm: Swtpm, handle: int, attributes: TPMA_OBJECT, algorithm: str = "ecc256"
) -> None:
    """Make a P-256 key with the given attributes straight through ESAPI and persist it."""
    context = tpm_connection.connection_for(swtpm.tcti).context
    primary, _, _, _, _ = context.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=tpm.srk_template()), ESYS_TR.RH_OWNER
    )
    try:
        template = TPM2B_PUBLIC.parse(algorithm, objectAttributes=attributes)
        private, public, _, _, _ = context.create(primary, TPM2B_SENSITIVE_CREATE(), template)
        child = context.load(primary, private, public)
        try:
            context.tr_close(context.evict_control(ESYS_TR.RH_OWNER, child, handle))
        finally:
            context.flush_context(child)
    finally:
        context.flush_context(primary)


_BASE = TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
_FIXED = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT


@pytest.mark.parametrize(
    ("attributes", "algorithm", "message"),
    [
        (_BASE | TPMA_OBJECT.SIGN_ENCRYPT, "ecc256", "lacks fixedTPM, fixedParent:"),
        (_BASE | _FIXED | TPMA_OBJECT.DECRYPT, "ecc256", "lacks sign:"),
        (
            _BASE | _FIXED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.RESTRICTED,
            "ecc256:ecdsa-sha256:null",
            "is a restricted key",
        ),
    ],
    ids=["duplicable", "no-sign", "restricted"],
)
def test_unsafe_key_rejected(
    swtpm: Swtpm, attributes: TPMA_OBJECT, algorithm: str, message: str
) -> None:
    uri = swtpm.handle_uri()
    handle = int(uri.split("=")[1].split("?")[0], 16)
    _persist_raw_key(swtpm, handle, attributes, algorithm)

    with pytest.raises(KeyPolicyError, match=message):
        open_key(uri)


def test_unreachable_tpm_raises_tpm_error(tmp_path: Path) -> None:
    uri = f"tpm2:path={tmp_path / 'k.pem'}?tcti=device:{tmp_path / 'no-tpm'}"

    with pytest.raises(TPMError, match="cannot open the TPM through TCTI"):
        tpm.generate_key(uri, "ec-p256")


# --- retries and lockout at the tpm2-pytss boundary -------------------------------------------


class _Failing:
    """An ESAPI function stand-in that raises the given TSS2 codes in turn, then returns."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.codes:
            raise TSS2_Exception(self.codes.pop(0))
        return "signed"


def test_retry_codes_are_retried() -> None:
    connection = tpm_connection.TpmConnection("device:/nonexistent")
    function = _Failing(0x922, 0x908, 0x90A)

    assert connection.call("TPM2_Sign", function) == "signed"
    assert function.calls == 4


def test_retry_gives_up_after_limit() -> None:
    connection = tpm_connection.TpmConnection("device:/nonexistent")
    function = _Failing(*[0x922] * tpm_connection.RETRY_ATTEMPTS)

    with pytest.raises(TPMError, match=r"TPM2_Sign: TPM_RC_RETRY \(0x922\)"):
        connection.call("TPM2_Sign", function)
    assert function.calls == tpm_connection.RETRY_ATTEMPTS


def test_lockout_code_not_retried() -> None:
    connection = tpm_connection.TpmConnection("device:/nonexistent")
    function = _Failing(0x921)

    with pytest.raises(TPMLockoutError, match=r"TPM2_Sign: TPM_RC_LOCKOUT \(0x921\)") as info:
        connection.call("TPM2_Sign", function)
    assert function.calls == 1
    assert info.value.rc == 0x921
    assert info.value.recovery_interval is None


def test_session_error_names_code() -> None:
    connection = tpm_connection.TpmConnection("device:/nonexistent")

    with pytest.raises(TPMError, match=r"TPM_RC_AUTH_FAIL \(0x98E\)"):
        connection.call("TPM2_Sign", _Failing(0x98E))


def test_lockout_from_wrong_authorizations(swtpm_factory: Callable[[], Swtpm]) -> None:
    simulator = swtpm_factory()
    key = tpm.generate_key(simulator.handle_uri(), "ec-p256")
    key.sign(b"before", ECDSA_SHA256)

    # A second client with a password-protected key: three wrong passwords trip the lockout.
    with ESAPI(simulator.tcti) as context:
        context.dictionary_attack_parameters(3, 77, 600)
        primary, _, _, _, _ = context.create_primary(
            TPM2B_SENSITIVE_CREATE(),
            TPM2B_PUBLIC(publicArea=tpm.srk_template()),
            ESYS_TR.RH_OWNER,
        )
        sensitive = TPM2B_SENSITIVE_CREATE()
        sensitive.sensitive.userAuth = b"right password"
        private, public, _, _, _ = context.create(primary, sensitive, TPM2B_PUBLIC.parse("ecc256"))
        protected = context.load(primary, private, public)
        context.flush_context(primary)
        context.tr_set_auth(protected, b"wrong password")
        for _ in range(3):
            with pytest.raises(TSS2_Exception):
                context.sign(protected, b"\x00" * 32, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
        context.flush_context(protected)

    with pytest.raises(TPMLockoutError, match="forgives one failed try every 77 s") as info:
        key.sign(b"after", ECDSA_SHA256)

    assert info.value.recovery_interval == 77
    assert info.value.failed_tries == 3
    connection = tpm_connection.connection_for(simulator.tcti)
    counter = connection.properties(TPM2_PT.LOCKOUT_COUNTER)
    assert counter == {int(TPM2_PT.LOCKOUT_COUNTER): 3}
    with pytest.raises(TPMLockoutError):
        key.sign(b"again", ECDSA_SHA256)


def test_default_key_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in tpm_connection.TCTI_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(tpm.KEY_PATH_ENV, raising=False)
    assert str(tpm.default_key_uri()) == "tpm2:path=/var/lib/device-sdk/device-key.tss2.pem"

    monkeypatch.setenv(tpm.KEY_PATH_ENV, "/data/key.pem")
    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:port=2321")
    assert str(tpm.default_key_uri()) == "tpm2:path=/data/key.pem?tcti=swtpm:port=2321"


@pytest.mark.parametrize("kind", ["handle", "path"])
def test_sign_after_simulator_restart(
    kind: str,
    swtpm_factory: Callable[[], Swtpm],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator = swtpm_factory()
    uri = simulator.handle_uri() if kind == "handle" else simulator.path_uri(tmp_path / "k.pem")
    key = tpm.generate_key(uri, "ec-p256")
    key.sign(b"before", ECDSA_SHA256)

    simulator.stop_process()
    with caplog.at_level("WARNING", logger="device_sdk.keys.tpm"):
        with pytest.raises(TPMError, match=r"tcti:IO failure \(0xA000A\): cannot open the TPM"):
            key.sign(b"while stopped", ECDSA_SHA256)
    assert "reconnecting and trying once more" in caplog.text

    # The restart is a TPM reset, so a blob's saved object context no longer loads either.
    simulator.start_process()
    signature = key.sign(b"after", ECDSA_SHA256)

    key.public_key().verify(signature, b"after", ECDSA_SHA256)


def test_forked_child_signs_on_its_own_link(swtpm: Swtpm) -> None:
    key = tpm.generate_key(swtpm.handle_uri(), "ec-p256")
    key.sign(b"parent", ECDSA_SHA256)
    read_end, write_end = os.pipe()

    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.write(write_end, key.sign(b"child", ECDSA_SHA256))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_signature = pipe.read()
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    key.public_key().verify(child_signature, b"child", ECDSA_SHA256)
    key.public_key().verify(key.sign(b"parent again", ECDSA_SHA256), b"parent again", ECDSA_SHA256)
