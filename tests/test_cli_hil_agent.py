"""``device-sdk hil-agent`` on a SoftHSM key: the JSON line protocol and its error replies."""

from __future__ import annotations

import json
import subprocess
import sys

from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk.keys import open_key
from device_sdk.keys.info import algorithm_name


def run_agent(uri: str, env: dict[str, str], *lines: str) -> list[dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "device_sdk", "hil-agent", "--key", uri],
        input="".join(line + "\n" for line in lines),
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_agent_hello_sign_keys(softhsm_key_uri: str, softhsm_env: dict[str, str]) -> None:
    key = open_key(softhsm_key_uri)
    label = softhsm_key_uri.split("object=")[1].split(";")[0].split("?")[0]

    hello, sign, keys = run_agent(
        softhsm_key_uri, softhsm_env,
        '{"op": "hello"}', '{"op": "sign", "count": 5}', '{"op": "keys"}', '{"op": "quit"}',
    )

    assert hello["ok"] is True
    assert hello["device_id"] == key.device_id
    assert hello["backend"] == "softhsm"
    assert hello["hardware_backed"] is False
    assert hello["algorithm"] == algorithm_name(key.public_key()) == "ec-p256"
    assert isinstance(key.public_key(), ec.EllipticCurvePublicKey)
    assert sign["ok"] is True
    assert sign["count"] == 5
    assert len(sign["latencies_ms"]) == 5  # type: ignore[arg-type]
    assert all(value > 0 for value in sign["latencies_ms"])  # type: ignore[attr-defined]
    assert keys["ok"] is True
    assert keys["supported"] is True
    assert label in keys["labels"]  # type: ignore[operator]
    assert keys["count"] == len(keys["labels"])  # type: ignore[arg-type]


def test_agent_error_replies(softhsm_key_uri: str, softhsm_env: dict[str, str]) -> None:
    replies = run_agent(
        softhsm_key_uri, softhsm_env,
        "not json", '{"op": "launch"}', '{"op": "sign", "count": 0}', '{"op": "http-login"}',
        '["op"]', '{"op": "counter"}',
    )

    assert [reply["ok"] for reply in replies] == [False] * 6
    assert str(replies[0]["error"]).startswith("invalid JSON request: ")
    assert replies[1]["error"] == (
        "unknown op 'launch': use one of counter, hello, http-login, keys, mqtt-connect, "
        "mqtt-start, mqtt-stop, mqtt-wait, quit, sign"
    )
    assert replies[2]["error"] == "invalid sign count 0: use an integer from 1 to 100000"
    assert replies[3]["error"] == "operation 'http-login' needs the agent started with --config"
    assert replies[4]["error"] == "a request is a JSON object with an 'op' string"
    assert replies[5]["error"] == "the softhsm key backend has no monotonic counter"
    assert {reply["error_type"] for reply in replies} == {"ConfigError"}
