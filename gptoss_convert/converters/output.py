"""Atomic, resumable, locked output directories.

OUT is built in a hidden sibling `.OUT.partial/` and renamed into place only when complete, so
OUT either does not exist or is whole. A journal inside the staging directory records finished
units of work; `resume=True` continues a staging directory whose plan fingerprint matches. A lock
file `.OUT.lock` beside OUT keeps two processes from writing the same OUT at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from gptoss_convert import faults
from gptoss_convert.converters.provenance import PROGRESS
from gptoss_convert.converters.remote_output import RemoteOutput, units_done
from gptoss_convert.errors import OutputError
from gptoss_convert.io.files import fsync_dir
from gptoss_convert.io.location import is_url

_NO_SPACE = {errno.ENOSPC: "no space left on the device (ENOSPC)", errno.EFBIG: "file size limit reached (EFBIG)",
             errno.EDQUOT: "disk quota exceeded (EDQUOT)"}


def open_output(out, **kw):
    """The output for destination `out`: a staged local directory, or a bucket prefix with
    commit markers (converters/remote_output.py). Nothing is checked or written until entered."""
    from gptoss_convert.io.location import Location, resolve

    out = resolve(out)
    return RemoteOutput(out, **kw) if isinstance(out, Location) else StagedOutput(out, **kw)


def disk_full(exc: BaseException | None) -> str | None:
    """Say which kind of 'out of space' `exc` is (an OSError, or TensorStore's error text,
    which carries the errno as os_error_code='N'); None if it is something else."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return _NO_SPACE[exc.errno]
    m = re.search(r"os_error_code='?(\d+)", str(exc)) if exc is not None else None
    return _NO_SPACE.get(int(m.group(1))) if m else None


class StagedOutput:
    """Context manager around one output directory; `path` is where to write meanwhile."""

    def __init__(self, out: str | os.PathLike, *, fingerprint: dict, overwrite: bool = False,
                 resume: bool = False, source: str | os.PathLike | None = None, need_bytes: int = 0, log=print):
        if is_url(out):     # Path("gs://b/x") would quietly make a local folder "gs:"
            raise OutputError(f"{out}: a bucket URL; open it with open_output()")
        self.out = Path(out).absolute()
        self.need_bytes = need_bytes           # free space required before anything is written
        self.source = source                   # never replaced by OUT, even with --overwrite
        self.staging = self.out.parent / f".{self.out.name}.partial"
        self.lockfile = self.out.parent / f".{self.out.name}.lock"
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.overwrite, self.resume, self.log = overwrite, resume, log
        self.resumed = False
        self.journal = "journal"               # one per process in a multi-process run (join())
        self._done: set[str] = set()
        self._lock_fd = None

    @property
    def path(self) -> Path:
        return self.staging

    def __enter__(self) -> "StagedOutput":
        parent = self.out.parent
        if not parent.is_dir():
            raise OutputError(f"{self.out}: parent directory {parent} does not exist; create it first")
        if self.out.exists() and not self.overwrite:
            raise OutputError(f"{self.out}: already exists; pass --overwrite to replace it")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{self.out}: cannot write in {parent} (read-only or no permission); choose another OUT")
        if self.source is not None and not is_url(self.source):     # a bucket SRC cannot hold a local OUT
            src, out = Path(self.source).resolve(), self.out.resolve()
            if out == src or out in src.parents:
                raise OutputError(f"{self.out}: is or contains the source checkpoint {self.source}; "
                                  "writing OUT there would replace the source; choose another OUT")
            if src in out.parents:
                raise OutputError(f"{self.out}: lies inside the source checkpoint {self.source}; "
                                  "the output would become part of the source; choose an OUT outside it")
        self._check_space(parent)
        self._lock()
        try:
            if self.out.exists() and not self.overwrite:   # another process finished it while we took the lock
                raise OutputError(f"{self.out}: already exists; pass --overwrite to replace it")
            self._prepare_staging()
        except BaseException:
            self._unlock()
            raise
        return self

    def _check_space(self, parent: Path) -> None:
        """Refuse before writing anything when the filesystem has less free space than the
        output needs (work a resumed run has already done counts as written)."""
        if not self.need_bytes:
            return
        free = shutil.disk_usage(parent).free
        if self.resume and self.staging.is_dir():
            free += sum(f.stat().st_size for f in self.staging.rglob("*") if f.is_file())
        if free < self.need_bytes:
            raise OutputError(f"{self.out}: needs {self.need_bytes / 1e9:.2f} GB of disk, "
                              f"{free / 1e9:.2f} GB available "
                              f"on {parent}; free space, choose another OUT, or pass --no-space-check")

    def _lock(self) -> None:
        try:
            fd = os.open(self.lockfile, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise OutputError(f"{self.out}: cannot create lock file {self.lockfile} ({e.strerror}); "
                              "choose another OUT") from None
        held = (f"{self.out}: another gptoss-convert process is writing it (lock {self.lockfile} is held); "
                "wait for it to finish")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(held) from None
        # A writer unlinks the lock file when it finishes. If that happened between our open and
        # our flock, we hold a lock on an unlinked file while the next process locks a new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.lockfile))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            raise OutputError(held)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _prepare_staging(self) -> None:
        plan_file = self.staging / PROGRESS / "plan.json"
        if self.staging.exists():
            old = json.loads(plan_file.read_text()) if plan_file.is_file() else None
            if self.resume and old == self.fingerprint:
                self._done = self._journaled()
                self.resumed = True
                self.log(f"resuming {self.out}: {units_done(self._done)} unit(s) already done")
                return
            if self.resume:
                self.log(f"note: {self.staging} was made with other inputs or options; starting over")
            else:
                self.log(f"note: removing {self.staging} left by an interrupted run (use --resume to continue one)")
            shutil.rmtree(self.staging)
        elif self.resume:
            self.log(f"note: nothing to resume for {self.out}; starting from scratch")
        try:
            (self.staging / PROGRESS).mkdir(parents=True)
            plan_file.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
        except OSError as e:
            raise OutputError(f"{self.out}: cannot create {self.staging} ({e.strerror}); choose another OUT") from None

    def _journaled(self) -> set[str]:
        """The units every journal in the staging directory records (a multi-process run keeps
        one journal per process; a resume with any number of processes counts them all)."""
        done: set[str] = set()
        for journal in (self.staging / PROGRESS).glob("journal*"):
            done |= set(journal.read_text().split("\n")) - {""}
        return done

    def join(self, journal: str, resumed: bool) -> "StagedOutput":
        """Work in a staging directory that another process prepared and will commit (a
        multi-process run): no lock, no checks, finished units recorded in `journal`."""
        self.journal, self.resumed = journal, resumed
        self._done = self._journaled()
        return self

    def is_done(self, key: str) -> bool:
        return key in self._done

    def entries(self) -> set[str]:
        """Every journal entry (units done, source hashes recorded), of every process."""
        return set(self._done)

    def mark_done(self, key: str, fault: bool = True) -> None:
        """Record a finished unit durably (after its data has been flushed)."""
        with open(self.staging / PROGRESS / self.journal, "a") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._done.add(key)
        if fault:
            faults.point("journal")

    def mark_done_many(self, keys: list[str], fault: bool = True) -> None:
        """Record finished units durably with one fsync for all of them (job.Journal's group commit):
        one append (one write call, so never interleaved with a source entry appended meanwhile)."""
        with open(self.staging / PROGRESS / self.journal, "ab", buffering=0) as f:
            data = "".join(k + "\n" for k in keys).encode()
            if f.write(data) != len(data):
                raise OSError(f"{self.staging / PROGRESS / self.journal}: short write to the journal")
            os.fsync(f.fileno())
        for k in keys:
            self._done.add(k)
            if fault:
                faults.point("journal")

    def commit(self) -> Path:
        """Make the staging directory OUT (atomically replacing an old OUT with --overwrite)."""
        faults.point("commit")
        shutil.rmtree(self.staging / PROGRESS)
        fsync_dir(self.staging)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        os.rename(self.staging, self.out)
        fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.lockfile.unlink()
            except OSError:
                pass
        self._unlock()
        why = disk_full(exc)
        if why:
            raise OutputError(f"{self.out}: cannot write: {why}; the work done so far is kept in {self.staging}: "
                              "free space (or raise the file size limit), then rerun the same command "
                              "with --resume") from exc
