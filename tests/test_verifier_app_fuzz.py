"""Property tests: random and mutated requests never get a 5xx from the verifier app or crash it.

The test client re-raises any exception the app does not handle, so "no unhandled exception" is
checked by every example along with the status code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fixtures_verifier import (
    HTTP_CB,
    ISSUER,
    PLAIN_BROKER,
    TOKEN_URL,
    Device,
    ManualClock,
    enroll,
    make_csr,
    make_key,
    make_verifier,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_sdk.auth import Challenge, b64url_encode, build_assertion
from device_sdk.verifier import Verifier
from device_sdk.verifier.app import create_app

POST_PATHS = [
    "/v1/challenges",
    "/v1/token",
    "/v1/enroll",
    "/v1/broker/auth/emqx",
    "/v1/broker/auth/rabbitmq/user",
    "/v1/broker/auth/rabbitmq/vhost",
    "/v1/broker/auth/rabbitmq/resource",
    "/v1/broker/auth/rabbitmq/topic",
]
FIELDS = [
    "device_id", "audience", "assertion", "csr", "enrollment_token", "backend",
    "hardware_backed", "username", "password", "clientid", "peerhost", "vhost", "resource",
    "name", "permission", "routing_key", "ip",
]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/x-www-form-urlencoded",
    "text/plain",
    "multipart/form-data; boundary=x",
    "",
]
EXAMPLES = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Text with a lone surrogate (U+D800..U+DFFF) somewhere: JSON can carry it as "\ud800", but it
# has no UTF-8 encoding. st.text() alone never draws one.
surrogate_text = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text(max_size=10),
    st.characters(categories=["Cs"]),
    st.text(max_size=10),
)
strings = st.text(max_size=50) | surrogate_text
keys = st.text(max_size=10) | surrogate_text
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | strings,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(keys, children, max_size=5),
    max_leaves=20,
)
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80
)


class App:
    """One verifier, its app and an enrolled device, shared by every example of a test."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = ManualClock()
        self.verifier: Verifier = make_verifier(tmp_path, self.clock)
        self.device: Device = enroll(self.verifier)
        self.client = TestClient(create_app(self.verifier), raise_server_exceptions=True)

    def http_assertion(self) -> str:
        challenge = Challenge.from_json(
            self.verifier.issue_challenge(self.device.device_id, ISSUER)
        )
        return build_assertion(
            self.device.key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL
        )

    def mqtt_assertion(self) -> str:
        challenge = Challenge.from_json(
            self.verifier.issue_challenge(self.device.device_id, PLAIN_BROKER)
        )
        return build_assertion(self.device.key, challenge, channel_binding=None)

    def close(self) -> None:
        self.client.close()
        self.verifier.close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    instance = App(tmp_path)
    yield instance
    instance.close()


def assert_no_server_error(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text)


def post_json(client: TestClient, path: str, value: Any) -> Any:
    """POST ``value`` as ASCII JSON; httpx's own encoder cannot send a lone surrogate."""
    body = json.dumps(value).encode("ascii")
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def test_random_bodies_never_5xx(app: App) -> None:
    @EXAMPLES
    @given(
        path=st.sampled_from(POST_PATHS),
        content_type=st.sampled_from(CONTENT_TYPES) | header_text,
        body=st.binary(max_size=2048)
        | json_values.map(lambda value: json.dumps(value).encode())
        | st.text(max_size=200).map(str.encode),
    )
    def check(path: str, content_type: str, body: bytes) -> None:
        headers = {"Content-Type": content_type} if content_type else {}
        assert_no_server_error(app.client.post(path, content=body, headers=headers))

    check()


def test_wrongly_typed_fields_never_5xx(app: App) -> None:
    @EXAMPLES
    @given(
        path=st.sampled_from(POST_PATHS),
        fields=st.dictionaries(
            st.sampled_from(FIELDS) | keys, json_values, max_size=8
        ),
        as_form=st.booleans(),
    )
    def check(path: str, fields: dict[str, Any], as_form: bool) -> None:
        if as_form:
            # A form travels as UTF-8, which cannot carry a lone surrogate: send it escaped.
            form = {
                name.encode("utf-8", "backslashreplace").decode(): (
                    value.encode("utf-8", "backslashreplace").decode()
                    if isinstance(value, str)
                    else json.dumps(value)
                )
                for name, value in fields.items()
            }
            response = app.client.post(path, data=form)
        else:
            response = post_json(app.client, path, fields)
        assert_no_server_error(response)

    check()


def mutate(token: str, data: st.DataObject) -> str:
    """Apply one random mutation to a compact JWS."""
    kind = data.draw(st.sampled_from(
        ["replace", "truncate", "insert", "swap", "header", "payload", "signature", "parts"]
    ))
    parts = token.split(".")
    if kind == "replace" and token:
        index = data.draw(st.integers(0, len(token) - 1))
        char = data.draw(st.characters(min_codepoint=0x20, max_codepoint=0x2FF))
        return token[:index] + char + token[index + 1:]
    if kind == "truncate":
        return token[: data.draw(st.integers(0, len(token)))]
    if kind == "insert":
        index = data.draw(st.integers(0, len(token)))
        return token[:index] + data.draw(st.text(max_size=20) | surrogate_text) + token[index:]
    if kind == "swap":
        order = data.draw(st.permutations(parts))
        return ".".join(order)
    if kind in ("header", "payload"):
        index = 0 if kind == "header" else 1
        original = json.loads(_b64decode(parts[index]))
        key = data.draw(st.sampled_from(sorted(original)) | st.text(max_size=6))
        original[key] = data.draw(json_values)
        parts[index] = b64url_encode(json.dumps(original).encode())
        return ".".join(parts)
    if kind == "signature":
        parts[2] = b64url_encode(data.draw(st.binary(max_size=600)))
        return ".".join(parts)
    count = data.draw(st.integers(0, 6))
    return ".".join(data.draw(st.text(max_size=30)) for _ in range(count))


def _b64decode(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_mutated_assertions_never_5xx(app: App) -> None:
    @EXAMPLES
    @given(data=st.data(), target=st.sampled_from(["token", "emqx", "rabbitmq"]))
    def check(data: st.DataObject, target: str) -> None:
        if target == "token":
            assertion = mutate(app.http_assertion(), data)
            response = post_json(app.client, "/v1/token", {"assertion": assertion})
            expected = (400,) if has_lone_surrogate(assertion) else (200, 401)
            assert response.status_code in expected, response.text
            return
        assertion = mutate(app.mqtt_assertion(), data)
        if target == "emqx":
            response = post_json(
                app.client,
                "/v1/broker/auth/emqx",
                {"username": app.device.device_id, "password": assertion},
            )
            if has_lone_surrogate(assertion):
                assert response.status_code == 400, response.text
                return
            assert response.status_code == 200, response.text
            assert response.json()["result"] in ("allow", "deny")
        else:
            # A form travels as UTF-8, which cannot carry a lone surrogate: send it escaped.
            password = assertion.encode("utf-8", "backslashreplace").decode()
            response = app.client.post(
                "/v1/broker/auth/rabbitmq/user",
                data={"username": app.device.device_id, "password": password},
            )
            assert response.status_code == 200, response.text
            assert response.text in ("allow", "deny")

    check()


def has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def test_random_csrs_and_bearer_tokens_never_5xx(app: App) -> None:
    valid_csr = make_csr(make_key("ES256")).decode()

    @EXAMPLES
    @given(
        csr=st.text(max_size=300)
        | surrogate_text
        | st.just(valid_csr).map(lambda pem: pem[:-40])
        | st.just(valid_csr + valid_csr),
        token=st.text(max_size=60),
        authorization=header_text,
    )
    def check(csr: str, token: str, authorization: str) -> None:
        body = {"csr": csr, "enrollment_token": token, "backend": "software",
                "hardware_backed": False}
        assert_no_server_error(post_json(app.client, "/v1/enroll", body))
        whoami = app.client.get("/v1/whoami", headers={"Authorization": authorization})
        assert whoami.status_code == 401

    check()
