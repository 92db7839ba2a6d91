"""One training job per run folder: a lock file `RUN/run.lock` taken by rank 0.

    lock = RunLock(run_dir)
    lock.acquire()      # RunFolderBusy (naming the folder and the holder) if a live job holds it
    ...
    lock.release()

Why a lock *file* with a heartbeat and not `flock`/`fcntl`: run folders live on cluster file
systems (NFS, Lustre, GPFS, BeeGFS) where POSIX locks are often off (Lustre without `-o flock`
answers ENOSYS), silently local to one node (NFS mounted `nolock`), or outlive a dead node until
a lease expires. What does work everywhere:

- **Creation is atomic**: the holder record is written to a private file which is then hard-linked
  to `run.lock`. `link()` fails if the name exists, and it is atomic on NFS too (unlike `O_EXCL`
  on old NFS); the link count of the private file tells whether it really succeeded when an NFS
  reply was lost (the lockfile(1) recipe).
- **A dead holder is recognised**:
  * on the same host, by its pid: the lock names the host, boot id, pid and the process's start
    time, so a reused pid or a reboot does not look alive;
  * on another host, by its heartbeat: the holder touches the file every `heartbeat_s`; a lock
    not touched for `stale_after_s` is stale. Ages are measured against the file system's clock
    (the mtime of a file we just wrote next to it), so clock skew between nodes does not matter;
  * a job that SLURM requeued (after preemption, a time limit or a node failure) keeps its job id
    and gets a higher `SLURM_RESTART_COUNT`: it takes back the lock of its own earlier run at once,
    wherever that ran.
- Taking over a stale lock renames it to a private name and checks it is still the one judged
  stale, so two requeued jobs racing for it cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("squarefuse")

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
# Long enough for a file system hiccup or a stalled NFS server not to hand a live job's folder to
# another one; a requeued SLURM job does not wait for it (see the module docstring).
STALE_AFTER_S = 300.0


class RunFolderBusy(RuntimeError):
    """Another live training job holds the run folder."""


def _job_id() -> str | None:
    """The scheduler's id of this job (the same across SLURM requeues), if any."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may contain spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('started')}"


class RunLock:
    """The lock of one run folder; `acquire` it before reading or writing anything in it."""

    def __init__(
        self, run_dir: str | Path, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": pid,
            "process_start": _process_start(pid),
            "job_id": _job_id(),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": secrets.token_hex(8),
        }

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise `RunFolderBusy` if a live job holds it."""
        assert not self.held, "RunLock.acquire called twice"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = self._record()
        private = self.run_dir / f".{LOCK_NAME}.{record['host']}.{record['pid']}.{record['token']}"
        private.write_text(json.dumps(record, indent=2) + "\n")
        try:
            for _ in range(5):  # a few rounds: a holder may release or be taken over meanwhile
                if self._link(private):
                    self._token = record["token"]
                    self._start_heartbeat()
                    return
                holder, age = self._read_holder(private)
                if holder is None:
                    continue  # released (or being replaced) between our link and our read
                reason = self._stale_reason(holder, record, age)
                if reason is None:
                    raise RunFolderBusy(
                        f"run folder {self.run_dir} is in use by another training job ({_describe(holder)}; "
                        f"its lock {self.path} was refreshed {age:.0f} s ago). Wait for that job to end or "
                        f"choose another folder (hydra.run.dir=...). If that job is certainly dead, delete "
                        f"{self.path}; a lock not refreshed for {self.stale_after_s:.0f} s is taken over."
                    )
                if self._take_over(holder):
                    log.warning("took over the stale lock of %s (%s): %s", self.run_dir, _describe(holder), reason)
            raise RunFolderBusy(f"could not take the lock {self.path}: other jobs keep taking it; try again")
        finally:
            private.unlink(missing_ok=True)

    def _link(self, private: Path) -> bool:
        try:
            os.link(private, self.path)
        except FileExistsError:
            return False
        except OSError:
            pass  # on NFS the link may have happened although the reply was lost: trust the count
        return private.stat().st_nlink == 2

    def _read_holder(self, private: Path) -> tuple[dict[str, Any] | None, float]:
        """The holder's record and the lock's age in the file system's clock (None if it vanished)."""
        try:
            text = self.path.read_text()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        private.touch()  # "now" as the file system sees it, next to the lock
        age = max(0.0, private.stat().st_mtime - mtime)
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = {}  # only a foreign or damaged file can be unreadable: we write it whole
        return holder if isinstance(holder, dict) else {}, age

    def _stale_reason(self, holder: dict[str, Any], me: dict[str, Any], age: float) -> str | None:
        """Why the holder is certainly gone, or None if it may be alive."""
        pid = holder.get("pid")
        if holder.get("host") == me["host"] and holder.get("boot_id") == me["boot_id"] and isinstance(pid, int):
            if not _pid_alive(pid):
                return f"process {pid} is not running"
            if holder.get("process_start") and holder.get("process_start") != _process_start(pid):
                return f"process {pid} is not the one that took the lock (its pid was reused)"
            return None
        if holder.get("host") == me["host"] and holder.get("boot_id") != me["boot_id"]:
            return "the host was rebooted since"
        if (
            me["job_id"]
            and holder.get("job_id") == me["job_id"]
            and me["restart_count"] > int(holder.get("restart_count") or 0)
        ):
            return f"it was taken by an earlier run of this job ({me['job_id']}), which was requeued"
        if age > self.stale_after_s:
            return f"not refreshed for {age:.0f} s (a live job refreshes it every {self.heartbeat_s:.0f} s)"
        return None

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Move the stale lock aside, if it is still the one judged stale; True if it was."""
        aside = self.run_dir / f".{LOCK_NAME}.stale.{secrets.token_hex(4)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, json.JSONDecodeError):
            moved = {}
        if moved.get("token") != stale.get("token"):
            # Someone replaced it meanwhile (a racing job took over): put theirs back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _owned(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self._token
        except (OSError, json.JSONDecodeError, AttributeError):
            return False

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._owned():
                log.error(
                    "the lock %s is no longer held by this job (another job took it over after %.0f s without "
                    "a heartbeat): two jobs may now write to %s",
                    self.path,
                    self.stale_after_s,
                    self.run_dir,
                )
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)  # None: the file system's own clock (NFS SET_TO_SERVER_TIME)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours; safe to call more than once."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._owned():
            self.path.unlink(missing_ok=True)
        self._token = None
