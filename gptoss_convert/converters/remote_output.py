"""Resumable output prefixes on object stores (gs://, s3://), where there is no rename.

On disk, OUT is built in a hidden sibling and renamed into place (converters/output.py). A
bucket has no rename, so the objects are written at their final keys and completeness is told
by markers instead, as Orbax itself does for GCS (CommitFileTemporaryPath): every array and
metadata object first, then conversion.json, then `<step>/commit_success.txt` (to_orbax). Around that:

    OUT/.gptoss-progress/plan.json        the run's fingerprint, written first
    OUT/.gptoss-progress/done/<unit>      one empty object per finished unit (the journal)
    (OUT/.gptoss-progress/ deleted)       last: the output is now complete

So an interrupted write never looks complete: before the commit marker Orbax (MaxText) takes
the step as unfinished; until the very end `.gptoss-progress/` remains, which `check` and this tool's
readers refuse. `--resume` continues from the journal when the fingerprint matches. A
non-empty OUT prefix is refused unless --overwrite (which deletes what is there first) or
--resume (which continues only an interrupted run of the same conversion). Object stores give
no lock: one writer per prefix is the user's promise.
"""

from __future__ import annotations

import json
import re
import urllib.parse

from gptoss_convert import faults
from gptoss_convert.converters.provenance import PROGRESS
from gptoss_convert.errors import InputError, OutputError
from gptoss_convert.io.location import Location, describe_store_error


def units_done(entries) -> int:
    """How many journal entries are units of work (not the source hashes recorded with them)."""
    return sum(1 for e in entries if not e.startswith("source\t"))


class RemoteOutput:
    """StagedOutput's interface (path, resumed, is_done, mark_done, commit) for an object-store prefix."""

    def __init__(self, out: Location, *, fingerprint: dict, overwrite: bool = False, resume: bool = False,
                 source=None, log=print, **_ignored):
        self.out = out
        self.source = source                   # a bucket source: OUT must not overlap it
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.overwrite, self.resume, self.log = overwrite, resume, log
        self.resumed = False
        self._done: set[str] = set()

    @property
    def path(self) -> Location:
        return self.out

    def __enter__(self) -> "RemoteOutput":
        self._refuse_overlap()
        try:
            keys = self.out.keys()
        except InputError as e:         # a missing bucket, no access: for OUT, an output error
            raise OutputError(str(e)) from None
        plan = self.out / PROGRESS / "plan.json"
        if not keys:
            return self._start()
        if f"{PROGRESS}/plan.json" in keys:
            if self.resume and json.loads(plan.read_text()) == self.fingerprint:
                self.join("", resumed=True)
                self.log(f"resuming {self.out}: {units_done(self._done)} unit(s) already done")
                return self
            if not (self.resume or self.overwrite):
                raise OutputError(f"{self.out}: holds an interrupted conversion; pass --resume to continue it "
                                  "or --overwrite to start over")
            self.log(f"note: {self.out} holds an interrupted conversion with other inputs or options; starting over")
        elif not self.overwrite:
            raise OutputError(f"{self.out}: not empty ({len(keys)} objects); pass --overwrite to replace them "
                              "or choose an empty prefix")
        else:
            self.log(f"note: deleting the {len(keys)} objects under {self.out} (--overwrite)")
        self.out.delete_tree()
        return self._start()

    def join(self, journal: str, resumed: bool) -> "RemoteOutput":
        """Write into the prefix another process (the leader) has prepared (a multi-process
        run): no checks; each unit's journal object is written by the one process that did it,
        so `journal` needs no name of its own here. Reads what is done when `resumed`."""
        self.resumed = resumed
        if resumed:
            keys = self.out.keys()
            self._done = {urllib.parse.unquote(k.split("/", 2)[2]) for k in keys if k.startswith(f"{PROGRESS}/done/")}
        return self

    def _start(self) -> "RemoteOutput":
        (self.out / PROGRESS / "plan.json").write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
        return self

    def is_done(self, key: str) -> bool:
        return key in self._done

    def entries(self) -> set[str]:
        """Every journal entry (units done, source hashes recorded)."""
        return set(self._done)

    def _refuse_overlap(self) -> None:
        """OUT must not be, hold or lie in a bucket SRC (--overwrite would delete it)."""
        src = self.source
        if not isinstance(src, Location) or (self.out.scheme, self.out.bucket) != (src.scheme, src.bucket):
            return
        if not self.out.key or any(a == b or a.startswith(b + "/") for a, b in ((src.key, self.out.key),
                                                                                 (self.out.key, src.key))):
            raise OutputError(f"{self.out}: is, holds or lies in the source checkpoint {src}; choose another OUT")

    def mark_done(self, key: str, fault: bool = True) -> None:
        """Record a finished unit (after its data is stored): one empty object."""
        (self.out / PROGRESS / "done" / urllib.parse.quote(key, safe="")).write_bytes(b"")
        self._done.add(key)
        if fault:
            faults.point("journal")

    def commit(self) -> Location:
        """Delete the journal: from now on the output is complete (its markers are in place)."""
        faults.point("commit")
        (self.out / PROGRESS).delete_tree()
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        # TensorStore's own errors (an array chunk that could not be stored) come as ValueError.
        if isinstance(exc, ValueError) and re.match(r"[A-Z_]{5,}: ", str(exc)):
            raise OutputError(f"{self.out}: {describe_store_error(exc, self.out.bucket)}; the objects written so far "
                              "are kept: rerun the same command with --resume") from exc


def pending_marker(writer, root, remote: bool) -> dict[str, bytes] | None:
    """{key: bytes} of the commit marker an object-store output writes after its record."""
    if not remote:
        return None
    target, text = writer.commit_marker()
    return {target.relative_to(root).as_posix(): text.encode()}
