"""Claims: many jobs (two sweeps, a Slurm array) write one results store, and one identity is evaluated by one job.

Before a job evaluates (or judges) a record it claims the record's key: `<key>.claim` beside the record, created
exclusively (O_CREAT | O_EXCL, atomic on local filesystems and NFS v3+), holding the owner's host, pid and start
time; a thread touches it every `heartbeat_s` while the job lives. A claim whose owner is gone can be taken over:
on the owner's host when its pid no longer runs, from anywhere when its heartbeat is older than `stale_after_s`.
A takeover happens under a short `<key>.claim.takeover` lock, so two successors never both take one claim. Claim
files end in `.claim`, never `.json`: no reader mistakes one for a record.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".claim"


@dataclass(frozen=True)
class ClaimSettings:
    heartbeat_s: float = 30.0  # how often a live owner touches its claim
    stale_after_s: float = 300.0  # a claim untouched this long is taken over, whatever host holds it


class Claim:
    """A held claim; `release()` (or leaving the `with`) removes it and stops its heartbeat."""

    def __init__(self, path: Path, owner: dict, settings: ClaimSettings):
        self.path, self.owner = path, owner
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(settings.heartbeat_s,), daemon=True,
                                      name=f"claim {path.name}")
        self._beat.start()

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            if _read(self.path) != self.owner:  # taken over after this process stalled past stale_after_s
                log.warning("%s: this job's claim was taken over by another job", self.path)
                return
            os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        self._beat.join()
        if _read(self.path) == self.owner:  # never remove a successor's claim
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_path(record: Path) -> Path:
    return record.with_suffix(SUFFIX)


def holder(record: Path, settings: ClaimSettings = ClaimSettings()) -> dict | None:
    """Who holds a live claim on `record` (host, pid, started), or None if it is free or its owner is gone."""
    path = claim_path(record)
    owner = _read(path)
    return owner if path.exists() and _alive(path, owner, settings) else None


def try_claim(record: Path, settings: ClaimSettings = ClaimSettings()) -> Claim | None:
    """Claim `record`'s key for this process; None if a live job holds it. A dead owner's claim is taken over."""
    path = claim_path(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(3):  # a takeover frees the claim; another job may still create it first
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _take_over(path, settings):
                return None
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        return Claim(path, owner, settings)
    return None


def _take_over(path: Path, settings: ClaimSettings) -> bool:
    """Remove `path` if its owner is gone; False if it is alive (or another successor is taking it over)."""
    owner = _read(path)
    if _alive(path, owner, settings):
        return False
    lock = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # another successor is at it; a lock left by one that died is cleared when old
        if _age(lock) > settings.stale_after_s:
            lock.unlink(missing_ok=True)
        return False
    try:
        os.close(fd)
        if _read(path) == owner and not _alive(path, owner, settings):  # still the claim judged stale
            log.warning("%s: taking over the claim of %s, which is gone", path, _label(owner))
            path.unlink(missing_ok=True)
        return True
    finally:
        lock.unlink(missing_ok=True)


def _alive(path: Path, owner: dict | None, settings: ClaimSettings) -> bool:
    age = _age(path)
    if age > settings.stale_after_s:
        return False
    if owner is None:  # just created, its owner still writing it (or it died doing so: then it goes stale)
        return True
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _read(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _label(owner: dict | None) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "an unknown owner"


def describe(owner: dict) -> str:
    """A live claim's owner as the sweep summary names it."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"{_label(owner)} since {started}"
