"""One training job per run folder: busy folders are refused naming the holder; stale locks
(dead process, silent other host, requeued SLURM job) are taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.configs import tiny_overrides
from helpers.scripts import run_script

from squarefuse.training.run_lock import LOCK_NAME, RunFolderBusy, RunLock

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300

HOLD = textwrap.dedent(
    """
    import sys, time
    from squarefuse.training.run_lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run; yields (run dir, its Popen)."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def no_job_env(monkeypatch):
    for name in ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


def write_lock(run: Path, **fields) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    record = {"host": "node-b", "boot_id": "x", "pid": 4242, "job_id": None, "restart_count": 0, "token": "t0"}
    record.update(fields)
    path = run / LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def test_second_lock_in_another_process_is_refused_then_taken_after_kill(holder, no_job_env):
    run, proc = holder
    with pytest.raises(RunFolderBusy) as err:
        RunLock(run).acquire()
    message = str(err.value)
    assert str(run) in message and f"pid {proc.pid}" in message and f"host {socket.gethostname()}" in message

    proc.kill()  # SIGKILL: no chance to release; the lock stays behind
    proc.wait()
    assert (run / LOCK_NAME).exists()
    lock = RunLock(run)
    lock.acquire()  # the holder's pid is dead on this host: stale
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_release_makes_the_folder_free_and_is_idempotent(tmp_path, no_job_env):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):  # also within one process
        RunLock(tmp_path).acquire()
    first.release()
    first.release()
    second = RunLock(tmp_path)
    second.acquire()
    first.release()  # not ours any more: must not remove the new holder's lock
    assert (tmp_path / LOCK_NAME).exists()
    second.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no private files left behind


def test_lock_of_a_live_other_host_is_refused_until_its_heartbeat_stops(tmp_path, no_job_env):
    path = write_lock(tmp_path, host="node-b", pid=77, job_id="555")
    with pytest.raises(RunFolderBusy, match=r"host node-b, pid 77, job 555"):
        RunLock(tmp_path, stale_after_s=300).acquire()
    old = time.time() - 1000
    os.utime(path, (old, old))  # no heartbeat for 1000 s: that node is gone
    lock = RunLock(tmp_path, stale_after_s=300)
    lock.acquire()
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    lock.release()


def test_requeued_slurm_job_takes_back_its_own_lock(tmp_path, monkeypatch):
    # The first run of job 555 held it on another node, which died (fresh heartbeat on disk).
    write_lock(tmp_path, host="node-b", pid=77, job_id="555", restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same run of the job (another step): busy
    with pytest.raises(RunFolderBusy):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "556")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # another job: busy
    with pytest.raises(RunFolderBusy):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "555")  # the requeued job: takes it back at once
    lock = RunLock(tmp_path)
    lock.acquire()
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (held["job_id"], held["restart_count"], held["pid"]) == ("555", 1, os.getpid())
    lock.release()


def test_reused_pid_and_reboot_do_not_look_alive(tmp_path, no_job_env):
    me = RunLock(tmp_path)._record()
    # Our own (alive) pid, but another process start time: the pid was reused.
    write_lock(tmp_path, host=me["host"], boot_id=me["boot_id"], pid=os.getpid(), process_start="1")
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    if me["boot_id"] is not None:  # Linux: a lock from before a reboot of this host
        write_lock(tmp_path, host=me["host"], boot_id="another-boot", pid=os.getpid())
        lock = RunLock(tmp_path)
        lock.acquire()
        lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path, no_job_env):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / LOCK_NAME
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.time() + 10
    while time.time() < deadline and path.stat().st_mtime < old + 500:
        time.sleep(0.05)
    assert path.stat().st_mtime > old + 500
    lock.release()


def test_two_racing_takeovers_of_a_stale_lock_leave_one_holder(tmp_path, no_job_env, monkeypatch):
    """B judged the old lock stale, but A took it over first: B must not remove A's fresh lock."""
    write_lock(tmp_path, host="node-b", pid=77, token="stale")
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_NAME, (old, old))
    b = RunLock(tmp_path)
    stale = json.loads((tmp_path / LOCK_NAME).read_text())
    a = RunLock(tmp_path)
    a.acquire()  # A takes over first
    assert not b._take_over(stale)  # B, acting on its stale reading, must back off
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == a._token
    a.release()


def test_train_py_refuses_a_busy_run_folder(holder, no_job_env, tmp_path):
    """A second job on a busy folder stops before reading or writing anything there."""
    run, proc = holder
    out = run_script("train.py", *tiny_overrides(tmp_path / "data"), f"hydra.run.dir={run}", cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "RunFolderBusy" in text and str(run) in text and f"pid {proc.pid}" in text, text[-3000:]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid  # the holder keeps it
