"""Claiming a run directory: one job at a time, and never over another run unasked.

``train`` refuses a run directory that already holds a run unless ``--resume`` (continue it)
or ``--overwrite`` (move it aside to ``RUN_DIR/replaced/<UTC time>/``; nothing is deleted). A
job holds the lock file ``RUN_DIR/.hpcsgd.lock`` for its lifetime: rank 0 takes an exclusive
``fcntl`` lock to check that no other job holds it, writes who it is (pid, host, start time)
into the file, and downgrades to a shared lock, which every other rank then takes too, so the
lock outlives a rank 0 that leaves early. The kernel drops the locks of a process that dies,
so a dead job's lock never blocks the next one. Where the filesystem has no locking (some
NFS or Lustre mounts), the pid and host written in the file decide: a record of a process
that no longer exists on this host is stale and taken over. The lock is held per process
for its lifetime: running a second job in the same process (a test, a user's script) on the
same directory reuses it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from mpi4py import MPI

    from ..config import TrainConfig

LOCK_NAME = ".hpcsgd.lock"
REPLACED = "replaced"
# What a run writes (DESIGN.md, "Run directory"); anything else (a batch log) is not the run.
RUN_ENTRIES = ("config.toml", "summary.json", "metrics", "checkpoints")
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

_held: dict[str, "RunLock"] = {}  # resolved run directory -> this process's lock on it


class RunDirError(ConfigError):
    """The run directory is in use by another job or already holds a run."""


class RunLock:
    """An open lock file and the kind of lock this process holds on it."""

    def __init__(self, path: Path, fd: int, kernel: bool):
        self.path = path
        self.fd = fd
        self.kernel = kernel  # False: the filesystem cannot lock; the record alone guards


def claim(cfg: "TrainConfig", comm: "MPI.Comm") -> None:
    """Collective: lock ``cfg.run_dir`` for this job and check it may train there.

    Raises (on every rank together) :class:`RunDirError` when another job holds the directory
    or it holds a run and neither ``resume`` nor ``overwrite`` is set, and ConfigError when
    the directory cannot be created.
    """
    from ..comm.agree import agree

    run_dir = Path(cfg.run_dir)
    agree(comm, lambda: _claim_rank0(run_dir, cfg, comm) if comm.rank == 0 else None, "run directory")
    if comm.rank != 0:
        _share(run_dir)


def _claim_rank0(run_dir: Path, cfg: "TrainConfig", comm: "MPI.Comm") -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the run directory {run_dir}: {exc.strerror}") from None
    lock(run_dir, ranks=comm.size)
    found = run_entries(run_dir)
    if found and not (cfg.resume or cfg.overwrite):
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(found)}): add --resume to continue it, "
            f"--overwrite to move it aside to {run_dir / REPLACED}/ and start afresh, or choose a new --run-dir"
        )


def run_entries(run_dir: Path) -> list[str]:
    """The parts of a run found in ``run_dir`` (empty folders do not count)."""
    found = []
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir():
            if any(path.iterdir()):
                found.append(name + "/")
        elif path.exists():
            found.append(name)
    return found


# -- the lock ----------------------------------------------------------------------------------
def lock(run_dir: Path, ranks: int = 1) -> RunLock:
    """Take this job's lock on ``run_dir`` (rank 0's part of :func:`claim`); idempotent per process."""
    key = str(run_dir.resolve())
    if key in _held:
        return _held[key]
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write the run directory {run_dir}: {exc.strerror}") from None
    try:
        kernel = _lock_exclusive(fd, path, run_dir)
        _write_record(fd, ranks, path)
        if kernel:
            fcntl.lockf(fd, fcntl.LOCK_SH)  # atomic downgrade: the other ranks may now share it
    except BaseException:
        os.close(fd)
        raise
    _held[key] = RunLock(path, fd, kernel)
    return _held[key]


def _lock_exclusive(fd: int, path: Path, run_dir: Path) -> bool:
    """True when the kernel holds the lock for us; False when the filesystem cannot lock."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"{run_dir} is in use by another job: {_describe(read_record(path), locked=True)}; "
                              f"wait for it to end, or choose another --run-dir") from None
        if exc.errno not in _NO_LOCKING:
            raise ConfigError(f"cannot lock the run directory {run_dir}: {exc.strerror}") from None
    record = read_record(path)
    if record and _may_be_alive(record):
        raise RunDirError(
            f"{run_dir} is in use by another job: {_describe(record, locked=False)} (this filesystem cannot lock "
            f"files, so its record in {path} decides; delete that file if the job is gone), or choose another --run-dir"
        )
    if record:
        print(f"hpcsgd: taking over the stale lock of {_describe(record, locked=False)} in {path}",
              file=sys.stderr, flush=True)
    return False


def _share(run_dir: Path) -> None:
    """A rank other than 0 takes a shared lock beside rank 0's (best effort)."""
    key = str(run_dir.resolve())
    if key in _held:
        return
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return  # a node-local path on a multi-node job: rank 0's lock still guards
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    _held[key] = RunLock(run_dir / LOCK_NAME, fd, True)


def _write_record(fd: int, ranks: int, path: Path) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ranks": ranks,
        "argv": sys.argv,
    }
    data = (json.dumps(record) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError as exc:  # a full disk: one line naming the lock file, not a traceback
        from ..metrics import cannot_write

        raise ConfigError(cannot_write(path, exc, len(data))) from None


def read_record(path: Path) -> dict:
    """What the job holding ``path`` wrote about itself ({} when nothing readable)."""
    try:
        record = json.loads(path.read_text(errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _may_be_alive(record: dict) -> bool:
    """Whether the process a record names may still run (only a process on this host can be checked)."""
    try:
        pid = int(record.get("pid"))
    except (TypeError, ValueError):
        return True  # an unreadable record: assume the worst
    if record.get("host") != socket.gethostname():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists but belongs to another user
    return True


def job_gone(run_dir: Path) -> str | None:
    """How the job that holds ``run_dir`` is known to be gone (its record names a process of this
    host that has exited), or None: running, never started, or on another host (unknowable)."""
    record = read_record(Path(run_dir) / LOCK_NAME)
    if not record or record.get("host") != socket.gethostname() or _may_be_alive(record):
        return None
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}, has exited"


def _describe(record: dict, locked: bool) -> str:
    if not record:
        return "no details recorded yet"
    text = f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"
    if record.get("ranks"):
        text += f", {record['ranks']} ranks"
    if locked and record.get("host") == socket.gethostname() and not _may_be_alive(record):
        text += " (its rank 0 has exited; other processes of that job still hold the lock: end them)"
    return text


# -- what --resume does -------------------------------------------------------------------------
def resolve_resume(run_dir: Path, resume: dict | None, total_steps: int) -> tuple[str, bool]:
    """Rank 0's part of ``--resume``: (the line that says what happens, whether the run had finished).

    Never silent: a finished run is left as it is; a run without a complete checkpoint (its
    only checkpoint has no COMPLETE record, or it ended before the first) is moved aside, as
    ``--overwrite`` does, before training starts from step 0, so nothing it wrote is lost; a
    directory without any run says that training starts from scratch.
    """
    incomplete = sorted(d.name for d in (run_dir / "checkpoints").glob("step-*") if not (d / "COMPLETE").exists())
    unfinished = (f" ({', '.join(incomplete)} has no COMPLETE record: its writing did not finish, so it is not used)"
                  if incomplete else "")
    if resume is not None:
        step = resume["step"]
        if step == total_steps and (run_dir / "summary.json").is_file():
            return (f"--resume: {run_dir} finished already (step {step} of {total_steps}; its figures are in "
                    f"{run_dir / 'summary.json'}): nothing to train, nothing rewritten; start a new run with "
                    f"--overwrite or a new --run-dir", True)
        if step == total_steps:
            return f"--resume: {run_dir} trained to its end (step {step}) but has no summary.json: writing it", False
        return f"--resume: resuming {run_dir} from step {step} of {total_steps}{unfinished}", False
    found = run_entries(run_dir)
    if not found:
        return f"--resume: {run_dir} holds no checkpoint (nor any run): starting from scratch (step 0)", False
    try:
        moved = move_aside(run_dir)
    except OSError as exc:
        raise ConfigError(f"--resume: cannot move the earlier run in {run_dir} aside: {exc.strerror}") from None
    return (f"--resume: {run_dir} has no complete checkpoint{unfinished or ' (the run ended before its first one)'}: "
            f"moved what it holds to {moved} (nothing deleted) and starting from step 0", False)


# -- preparing the directory --------------------------------------------------------------------
def prepare(comm: "MPI.Comm", run_dir: Path, cfg: "TrainConfig", rank: int) -> None:
    """Rank 0 moves an old run aside (``overwrite``), makes the folders and writes config.toml;
    then every rank checks it can write there.

    Two agreements, so that rank 0 failing to create the directory is reported by every
    rank instead of leaving the others waiting for it.
    """
    from ..comm.agree import agree
    from ..metrics import atomic_write_text

    def make() -> None:
        if comm.rank != 0:
            return
        try:
            if cfg.overwrite and run_entries(run_dir):
                moved = move_aside(run_dir)
                print(f"hpcsgd: --overwrite: moved the previous run in {run_dir} to {moved} (nothing deleted)",
                      file=sys.stderr, flush=True)
            (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            atomic_write_text(run_dir / "config.toml", cfg.to_toml())
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {run_dir}: {exc.strerror}") from None

    def probe() -> None:
        try:
            path = run_dir / "metrics" / f".probe-{rank}"
            path.write_text("")
            path.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {run_dir}: {exc.strerror}") from None

    agree(comm, make, "run directory")
    agree(comm, probe, "run directory")


def move_aside(run_dir: Path) -> Path:
    """Move the run in ``run_dir`` to ``run_dir/replaced/<UTC time>/``; returns that folder.

    Each entry is one rename within the directory (the same filesystem): nothing is copied,
    nothing is deleted, and ``hpcsgd report RUN_DIR`` no longer sees the old run.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = run_dir / REPLACED / stamp
    n = 1
    while target.exists():
        n += 1
        target = run_dir / REPLACED / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for name in RUN_ENTRIES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, target / name)
    return target


__all__ = ["LOCK_NAME", "RunDirError", "claim", "job_gone", "lock", "move_aside", "prepare", "read_record", "resolve_resume",
           "run_entries"]
