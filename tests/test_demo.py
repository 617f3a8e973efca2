"""`device-sdk demo`: a full run, and interrupts at several points that leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_sdk.keys import softhsm

PID_RE = re.compile(r"\(PID (\d+)\)")
DIRECTORY_RE = re.compile(r"(/\S*device-sdk-demo-[A-Za-z0-9_]+)")


@pytest.fixture(autouse=True)
def _require_softhsm() -> None:
    try:
        softhsm.find_library()
    except softhsm.SoftHSMError:
        pytest.skip("SoftHSM not found; install it with: sudo apt-get install -y softhsm2")


def _demo_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp_path)
    env.pop("SOFTHSM2_CONF", None)
    return env


def _processes_mentioning(text: str) -> list[int]:
    """Return PIDs whose command line or environment mentions ``text`` (the demo directory)."""
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            data = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in data:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_demo_json_succeeds(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "device_sdk", "demo", "--json"],
        env=_demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["ok"] is True
    assert report["http"]["success"] is True
    assert report["mqtt"]["success"] is True
    assert report["hardware_backed"] is False
    assert report["key"] == {"backend": "softhsm", "hardware_backed": False}
    assert report["http"]["whoami"] == report["device_id"]
    assert report["verifier_url"].startswith("https://127.0.0.1:")
    assert report["broker_url"].startswith("mqtts://127.0.0.1:")
    assert report["mqtt"]["channel_bound"] is True
    assert report["error"] is None
    for step in ("verifier_start", "broker_start", "provision", "http_login", "shutdown"):
        assert report["timings_ms"][step] > 0, step

    pids = [int(pid) for pid in PID_RE.findall(completed.stderr)]
    assert len(pids) == 3  # verifier, broker, provision
    assert [pid for pid in pids if _alive(pid)] == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("marker", "signum"),
    [
        ("started verifier", signal.SIGINT),
        ("verifier ready", signal.SIGINT),
        ("started MQTT broker", signal.SIGINT),
        ("created a one-time enrollment token", signal.SIGINT),
        ("running device-sdk provision", signal.SIGINT),
        ("broker ready", signal.SIGTERM),
    ],
)
def test_demo_interrupted_leaves_nothing(tmp_path: Path, marker: str, signum: int) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "device_sdk", "demo", "--json"],
        env=_demo_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert demo.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = demo.stderr.readline()
            if not line:
                break
            lines.append(line)
            if marker in line:
                demo.send_signal(signum)
                break
        rest = demo.communicate(timeout=60)[1]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = "".join(lines) + rest

    assert any(marker in line for line in lines), output
    assert demo.returncode == 130, output
    assert "device-sdk: interrupted" in output
    pids = [int(pid) for pid in PID_RE.findall(output)]
    assert pids, output
    assert [pid for pid in pids if _alive(pid)] == []
    directory = DIRECTORY_RE.search(output)
    assert directory is not None, output
    assert [pid for pid in _processes_mentioning(directory.group(1)) if _alive(pid)] == []
    assert not Path(directory.group(1)).exists()
