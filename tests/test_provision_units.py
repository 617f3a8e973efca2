"""Provisioning building blocks without a token: state record, lock, manifest, batch runner."""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from device_sdk.cli.provision import _Progress
from device_sdk.errors import ConfigError, LockHeldError, PinIncorrectError, ProvisioningError
from device_sdk.provisioning.batch import (
    ManifestRow,
    RowOutcome,
    RowResult,
    parse_manifest,
    run_batch,
    write_report,
)
from device_sdk.provisioning.lock import exclusive_lock, lock_path_for
from device_sdk.provisioning.state import (
    STEPS,
    ProvisioningState,
    load_state,
    save_state,
    state_path_for,
)


def test_state_round_trip(tmp_path: Path) -> None:
    path = state_path_for(tmp_path / "device.toml")
    state = ProvisioningState(key_uri="pkcs11:token=a;object=k", device_id="abc")
    state.mark_done("key")
    state.mark_done("key")
    save_state(path, state)

    loaded = load_state(path)
    assert path.name == "device.toml.provisioning.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert loaded is not None
    assert loaded.completed == ["key"]
    assert loaded.device_id == "abc"
    assert not loaded.finished


def test_state_finished_after_all_steps() -> None:
    state = ProvisioningState()
    for step in STEPS:
        state.mark_done(step)
    assert state.finished


def test_state_unknown_step_rejected() -> None:
    with pytest.raises(ValueError, match="unknown provisioning step 'flash'"):
        ProvisioningState().mark_done("flash")


def test_state_missing_file_is_none(tmp_path: Path) -> None:
    assert load_state(tmp_path / "none.json") is None


def test_state_corrupt_file_names_fix(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("{not json")
    with pytest.raises(ProvisioningError, match="delete it to start provisioning over"):
        load_state(path)


def test_state_wrong_version_rejected(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(ProvisioningError, match="unknown format"):
        load_state(path)


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from device_sdk.provisioning.lock import exclusive_lock
    with exclusive_lock(Path(sys.argv[1]), what="token 't'"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def _start_holder(lock_path: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock_path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_lock_second_run_names_pid_and_file(tmp_path: Path) -> None:
    lock_path = tmp_path / "t.lock"
    holder = _start_holder(lock_path)
    try:
        with pytest.raises(LockHeldError) as info:
            with exclusive_lock(lock_path, what="token 't'"):
                pass
    finally:
        holder.kill()
        holder.wait()

    assert info.value.holder_pid == holder.pid
    assert info.value.lock_path == lock_path
    assert f"PID {holder.pid}" in str(info.value)
    assert str(lock_path) in str(info.value)
    assert "token 't' is being provisioned by another run" in str(info.value)


def test_lock_waits_for_holder_pid(tmp_path: Path) -> None:
    lock_path = tmp_path / "t.lock"
    # A holder that has taken the lock but not yet written its PID, as just after flock().
    holder_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder_fd, fcntl.LOCK_EX)
    writer = threading.Timer(0.05, os.pwrite, (holder_fd, b"4242\n", 0))
    writer.start()
    try:
        with pytest.raises(LockHeldError) as info:
            with exclusive_lock(lock_path, what="token 't'"):
                pass
    finally:
        writer.join()
        os.close(holder_fd)

    assert info.value.holder_pid == 4242
    assert "(PID 4242, lock file" in str(info.value)


def test_lock_taken_when_holder_releases(tmp_path: Path) -> None:
    lock_path = tmp_path / "t.lock"
    # A holder that has cleared its PID and is about to unlock, as at the end of its run.
    holder_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder_fd, fcntl.LOCK_EX)
    releaser = threading.Timer(0.05, os.close, (holder_fd,))
    releaser.start()
    try:
        with exclusive_lock(lock_path, what="token 't'") as path:
            locked_pid = path.read_text().strip()
    finally:
        releaser.join()

    assert locked_pid == str(os.getpid())


def test_lock_freed_when_holder_killed(tmp_path: Path) -> None:
    lock_path = tmp_path / "t.lock"
    holder = _start_holder(lock_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()

    with exclusive_lock(lock_path, what="token 't'") as path:
        assert path.read_text().strip() == str(os.getpid())
    assert path.read_text() == ""


def test_lock_path_distinguishes_unsafe_names(tmp_path: Path) -> None:
    first = lock_path_for("pkcs11-token-a/b", tmp_path)
    second = lock_path_for("pkcs11-token-a:b", tmp_path)
    assert first != second
    assert first.parent == tmp_path
    assert first.name.startswith("pkcs11-token-a_b-")


MANIFEST = """\
# devices for line 3
key,pin_file,enrollment_token_file,config,allow_software_key,verifier

edge-01,pins/01,tokens/01,out/01.toml,true,
pkcs11:token=edge-02;object=k,,/abs/tok,out/02.toml,no,http://127.0.0.1:1
"""


def test_manifest_parses_rows(tmp_path: Path) -> None:
    rows = parse_manifest(MANIFEST, base_dir=tmp_path)

    assert len(rows) == 2
    assert rows[0] == ManifestRow(
        row=1,
        line=4,
        key="edge-01",
        enrollment_token_file=tmp_path / "tokens/01",
        config=tmp_path / "out/01.toml",
        pin_file=tmp_path / "pins/01",
        allow_software_key=True,
    )
    assert rows[1].line == 5
    assert rows[1].enrollment_token_file == Path("/abs/tok")
    assert rows[1].pin_file is None
    assert rows[1].allow_software_key is False
    assert rows[1].verifier == "http://127.0.0.1:1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no header row"),
        ("key,config\nx,y\n", "lacks required column\\(s\\) enrollment_token_file"),
        ("key,config,enrollment_token_file,colour\n", "unknown column\\(s\\) colour"),
        ("key,config,enrollment_token_file\nx,,t\n", "line 2: empty required value\\(s\\) config"),
        (
            "key,config,enrollment_token_file,allow_software_key\nx,c,t,maybe\n",
            "line 2: column 'allow_software_key' must be true or false, not 'maybe'",
        ),
    ],
)
def test_manifest_errors_name_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_manifest(text, base_dir=tmp_path)


def _rows(tmp_path: Path, count: int) -> list[ManifestRow]:
    return [
        ManifestRow(
            row=i,
            line=i + 1,
            key=f"token-{i}",
            enrollment_token_file=tmp_path / f"tok{i}",
            config=tmp_path / f"dev{i}.toml",
        )
        for i in range(1, count + 1)
    ]


def test_batch_continues_past_failures_and_skips_done(tmp_path: Path) -> None:
    rows = _rows(tmp_path, 4)
    calls: list[int] = []

    def provision_row(row: ManifestRow) -> RowOutcome:
        calls.append(row.row)
        if row.row == 2:
            raise ProvisioningError("bad PIN", step="key") from PinIncorrectError("wrong")
        if row.row == 3:
            raise RuntimeError("bug")
        state = ProvisioningState(device_id=f"id{row.row}")
        for step in STEPS:
            state.mark_done(step)
        save_state(state_path_for(row.config), state)
        row.config.write_text("")
        return RowOutcome(device_id=f"id{row.row}", reused_key=False)

    progress: list[tuple[int, int, str]] = []
    report = run_batch(
        rows,
        provision_row,
        manifest="m.csv",
        on_row_done=lambda d, t, r: progress.append((d, t, r.status)),
    )

    assert calls == [1, 2, 3, 4]
    assert report.summary == {"total": 4, "provisioned": 2, "skipped": 0, "failed": 2}
    assert progress == [
        (1, 4, "provisioned"),
        (2, 4, "failed"),
        (3, 4, "failed"),
        (4, 4, "provisioned"),
    ]
    assert report.rows[1].step == "key"
    assert report.rows[1].error == "key: bad PIN"
    assert report.rows[1].error_type == "PinIncorrectError"
    assert report.rows[2].error_type == "RuntimeError"
    assert not report.ok

    calls.clear()
    second = run_batch(rows, provision_row, manifest="m.csv")
    assert calls == [2, 3]
    assert [r.status for r in second.rows] == ["skipped", "failed", "failed", "skipped"]
    assert second.rows[0].device_id == "id1"

    report_path = tmp_path / "report.json"
    write_report(report_path, second)
    written = json.loads(report_path.read_text())
    assert written["summary"] == {"total": 4, "provisioned": 0, "skipped": 2, "failed": 2}
    assert [r["row"] for r in written["rows"]] == [1, 2, 3, 4]


def test_lock_holder_timing_is_immediate(tmp_path: Path) -> None:
    lock_path = tmp_path / "t.lock"
    holder = _start_holder(lock_path)
    try:
        started = time.monotonic()
        with pytest.raises(LockHeldError):
            with exclusive_lock(lock_path, what="token 't'"):
                pass
        assert time.monotonic() - started < 1.0
    finally:
        holder.kill()
        holder.wait()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _result(row: int, status: str, error: str | None = None) -> RowResult:
    return RowResult(
        row=row, line=row + 1, key=f"edge-{row}", config="c", status=status, error=error
    )


def test_progress_bar_on_terminal() -> None:
    stream = _Terminal()
    progress = _Progress(stream)

    progress(1, 2, _result(1, "provisioned"))
    progress(2, 2, _result(2, "failed", "key: token 'edge-2' not found"))

    text = stream.getvalue()
    assert text.startswith("\r[" + "#" * 15 + "-" * 15 + "] 1/2  ok 1  skipped 0  failed 0")
    assert "\r[" + "#" * 30 + "] 2/2  ok 1  skipped 0  failed 1" in text
    assert "\n  row 2 (edge-2): key: token 'edge-2' not found\n" in text
    assert text.endswith("\n")


def test_progress_lines_without_terminal() -> None:
    stream = io.StringIO()
    progress = _Progress(stream)

    progress(1, 2, _result(1, "skipped"))
    progress(2, 2, _result(2, "failed", "boom"))

    assert stream.getvalue() == (
        "row 1/2 edge-1: skipped (0.00 s)\nrow 2/2 edge-2: failed: boom (0.00 s)\n"
    )
