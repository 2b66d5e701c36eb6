"""The conversion protocol, once: every converting command is a checked plan (a `Target`) run here.

The durable steps always come in one order, whatever the command, the destination (a local
directory or a gs:// / s3:// prefix) or the number of processes:

    fingerprint -> agree -> check OUT (before any byte) -> stage (or resume onto the same bytes)
    -> hash the source -> write this process's units, journaling each -> merge the shares
    -> (leader) the target's own files -> conversion.json -> commit marker -> commit -> announce

A command supplies a `Source` (what is read: its files, how they are hashed) and a `Target`
(what is written: units of work, how they are written and finished), never the steps themselves
(docs/design.md). `Output` (converters/output.py) is chosen by the destination; `Cluster` or
`Solo` (converters/distributed.py) by the options.

Resume means the same bytes: the journal records the content hash of every source file
(`source\\t<file>\\t<algorithm>\\t<digest>` entries) before the first unit that may have read it,
and a resumed run hashes its source first and continues only if every recorded hash matches
(else it refuses, naming the first file that differs).
"""

from __future__ import annotations

import dataclasses
import resource
import threading
import time
from typing import Callable, Protocol

from threadpoolctl import threadpool_limits

from gptoss_convert.buffers import keep_freed_memory, retain_freed_memory_up_to
from gptoss_convert.converters import distributed as dist
from gptoss_convert.converters.common import parse_size
from gptoss_convert.converters.output import open_output
from gptoss_convert.converters.provenance import write_record
from gptoss_convert.converters.stream import background
from gptoss_convert.errors import ConvertError, InputError, OutputError
from gptoss_convert.io.files import HASHES
from gptoss_convert.io.location import is_url
from gptoss_convert.progress import progress, step

SOURCE_ENTRY = "source"
RUNTIME_BYTES = 400 << 20   # the process before its first block: Python, numpy, TensorStore, the plan
DEFAULT_MAX_MEMORY = "1.5GB"    # --max-memory: the ceiling every converting command fits its plan under


class ResourceError(OutputError):
    """The plan needs more memory than this machine has available: refused before any work."""


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclasses.dataclass(frozen=True)
class Memory:
    """What a target holds at once: `per` blocks for each unit of its parallelism (threads
    decoding, writes in flight) and `fixed` more, each at most `largest` bytes; `most` is the
    parallelism it is planned with. The blocks are bounded by the plan (one expert, a row block
    of at most --block bytes), never by the model's size."""

    largest: int
    most: int
    per: int
    fixed: int
    transient: int = 0      # blocks a read allocates outside the pools (TensorStore's results), freed after

    def peak(self, parallel: int) -> int:
        """Bytes at the peak with `parallel`: the runtime and the blocks held at once."""
        return RUNTIME_BYTES + (self.per * parallel + self.fixed + self.transient) * self.largest


def memory_ceiling(value: int | str) -> int:
    """The --max-memory value in bytes (a size such as "1.5GB" or "800MiB")."""
    try:
        return parse_size(value)
    except ConvertError as e:
        raise InputError(f"--max-memory {value!r}: not a size; write e.g. 1.5GB or 800MiB") from e


def fit_memory(target, ceiling: int, check_available: bool = True) -> int:
    """Set `target.parallel` to the most its `memory` allows under `ceiling` bytes (the
    --max-memory ceiling) and return the peak estimate; refuse (ResourceError, exit 3) a plan
    whose least parallel form does not fit, or, with `check_available`, whose estimate exceeds
    the memory available now (a stranger's checkpoint can declare blocks of any size)."""
    m: Memory = target.memory
    fits = [p for p in range(max(m.most, 1), 0, -1) if m.peak(p) <= ceiling]
    if not fits:
        raise ResourceError(f"{target.command}: needs at least {m.peak(1) / 1e9:.2f} GB of memory at its peak "
                            f"(blocks of up to {m.largest / 1e6:.0f} MB over the runtime), more than --max-memory "
                            f"{ceiling / 1e9:.2f} GB; raise --max-memory")
    target.parallel = fits[0]
    need, free = m.peak(fits[0]), available_memory()
    if check_available and free is not None and need > free:
        raise ResourceError(f"{target.command}: needs about {need / 1e9:.1f} GB of memory at its peak (blocks in "
                            f"flight over the runtime), {free / 1e9:.1f} GB available; free memory, lower "
                            "--max-memory or --workers, or pass --no-space-check to run anyway")
    return need


@dataclasses.dataclass(frozen=True)
class Unit:
    """One journaled piece of work: a block of an Orbax leaf, or a safetensors shard. `reads`:
    the source files it may read, where the target knows them (then it is journaled as soon as
    their hashes are, not only once the whole source is hashed); None: any of them."""

    key: str
    nbytes: int
    reads: frozenset[str] | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """What every converting command accepts, resolved once at the API boundary."""

    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    check_space: bool = True
    max_memory: int | str = DEFAULT_MAX_MEMORY     # the ceiling (bytes, or a size such as "1.5GB")


class Source(Protocol):
    """What a conversion reads: its files (relative names), where they live, how they are hashed."""

    root: object                        # a Path or a Location (recorded as the source's path)
    config_raw: dict

    def files(self) -> list[str]: ...
    def sizes(self) -> dict[str, int | None]: ...
    def hash(self, files: list[str]) -> dict[str, dict]: ...


class Target(Protocol):
    """What a conversion writes: its units, and how each is written and the output finished."""

    command: str
    units: list[Unit]

    def fingerprint(self) -> dict: ...
    def options(self) -> dict: ...
    def groups(self) -> list[int] | None: ...
    def still_there(self, path, unit: Unit) -> bool: ...
    def create(self, path, first: bool, resumed: bool) -> None: ...
    def write(self, path, units: list[Unit], journal: "Journal", bar) -> tuple[dict, dict]: ...
    def finish(self, path, remote: bool, shares: dict) -> "Finished": ...
    def summary(self, result, seconds: float) -> str: ...


@dataclasses.dataclass
class Finished:
    """What the target's leader step left for the record: extra fields, output hashes and sizes
    it knows (the rest are hashed from disk), and the commit marker of a bucket output."""

    extra: dict
    hashes: dict
    sizes: dict
    pending: dict | None = None
    commit: Callable[[], None] | None = None


class Journal:
    """The output's journal, written through it: a unit is recorded only once the hashes of the
    source bytes it may have read are recorded before it (resume means the same bytes): the
    hashes known so far are recorded as they come, a unit that says what it reads (`Unit.reads`)
    is released once those are, any other once every process has hashed its whole share."""

    def __init__(self, output, hashing: "Hashing", bar, cluster):
        self.output, self.hashing, self.bar, self.cluster = output, hashing, bar, cluster
        self._held: list[Unit] = []
        self._recorded: set[str] = set()
        self._sources_written = self._all = False
        self._pending: list[str] = []           # released unit keys the journal writer has not taken yet
        self._lock = threading.Lock()
        self._writer = None                     # the journal writer's Future (the last one started)
        self._writing = False                   # whether it is still to take what is pending

    def is_done(self, unit: Unit) -> bool:
        return self.output.is_done(unit.key)

    def done(self, unit: Unit, counted: bool = False) -> None:
        """`unit`'s bytes are durable: journal it (held back until the source hashes it may have
        read are recorded). `counted`: the target already advanced the progress bar by its bytes."""
        if not counted:
            self.bar.update(unit.nbytes)
        self._held.append(unit)
        self._release()

    def flush(self, wait: bool = False) -> None:
        """Journal what is held back. With `wait` (after this process's last unit), first wait for
        this process's source hashes and then every other process's (a unit of this process may
        have read files another one hashed)."""
        if wait:
            self.hashing.result()
            self._sources()
            self.cluster.wait_all_hashed()
            self._all = True
        self._release()
        if wait and self._writer is not None:
            self._writer.result()               # every released unit is in the journal now

    def _sources(self) -> bool:
        """Record the source hashes known so far, each once; whether all of this process's are."""
        if not self._sources_written:
            done = self.hashing.done()
            known = self.hashing.result() if done else self.hashing.known()
            for f in sorted(set(known) - self._recorded):
                self.output.mark_done(source_entry(f, known[f]), fault=False)
                self._recorded.add(f)
            self._sources_written = done
        return self._sources_written

    def _everyone(self) -> bool:
        """Whether every process has recorded its source hashes (posts this one's, which is)."""
        self._all = self._all or self.cluster.all_hashed()
        return self._all

    def _release(self) -> None:
        """Journal each held unit whose source hashes are recorded: hand it to the journal writer,
        a thread that appends every key released while its last fsync ran with one fsync (a group
        commit), after the source entries (written before, on this thread). The caller goes on
        at once: an fsync per unit on the converting thread held it 1.5 s of a 10 s one-layer
        Qwen3-30B-A3B to-orbax (412 blocks of ~3 MB, py-spy; the full model has 18,885). A
        writer's error is raised here or at the final flush."""
        complete = self._sources() and self._everyone()
        ready = [u for u in self._held if complete or (u.reads is not None and u.reads <= self._recorded)]
        self._held = [u for u in self._held if u not in ready]
        with self._lock:
            if self._writer is not None and self._writer.done() and self._writer.exception() is not None:
                raise self._writer.exception()
            self._pending += [u.key for u in ready]
            if not self._writing and self._pending:
                self._writing = True
                self._writer = background(self._write_pending)

    def _write_pending(self) -> None:
        """The journal writer: until nothing is pending, journal what is (one fsync each time)."""
        many = getattr(self.output, "mark_done_many", None)
        try:
            while True:
                with self._lock:
                    keys, self._pending = self._pending, []
                    if not keys:
                        self._writing = False
                        return
                if many is not None:
                    many(keys)
                else:
                    for k in keys:
                        self.output.mark_done(k)
        except BaseException:
            with self._lock:
                self._writing = False
            raise


def source_entry(file: str, digests: dict) -> str:
    """The journal entry recording one source file's content hash (or its size alone, where the
    source's policy does not hash it)."""
    algo, digest = next(((a, digests[a]) for a in HASHES if a in digests), ("size", str(digests.get("size"))))
    return f"{SOURCE_ENTRY}\t{file}\t{algo}\t{digest}"


def recorded_sources(entries) -> dict[str, tuple[str, str]]:
    """{file: (algorithm, digest)} from journal entries."""
    out = {}
    for e in entries:
        parts = e.split("\t")
        if len(parts) == 4 and parts[0] == SOURCE_ENTRY:
            out[parts[1]] = (parts[2], parts[3])
    return out


class Hashing:
    """The source's files hashed on a background thread (overlapping the conversion), or given."""

    def __init__(self, fn: Callable[[], dict] | None = None, known: dict | None = None):
        self._known = known
        self._future = None if fn is None else background(fn)

    def done(self) -> bool:
        return self._known is not None or self._future.done()

    def known(self) -> dict:
        """The files hashed so far (all of them, at once, when the background hash ends)."""
        return self.result() if self.done() else {}

    def result(self) -> dict:
        return self._known if self._known is not None else self._future.result()


def _same_bytes(output, fresh: dict, where) -> None:
    """A resumed run continues only onto the bytes the interrupted one read: refuse naming the
    first recorded source file whose hash (or size) differs now."""
    for f, (algo, digest) in sorted(recorded_sources(output.entries()).items()):
        if f not in fresh:          # another process's share: that process compares it
            continue
        got = str(fresh[f].get("size")) if algo == "size" else fresh[f].get(algo)
        if got != digest:
            raise InputError(f"{where}: --resume would splice two sources: {f} differs from the one the "
                             f"interrupted run read ({algo} {digest[:16]} then, {str(got)[:16]} now); "
                             "rerun without --resume to start over")


def run(source: Source, target: Target, out, opts: JobOptions, cluster: dist.Cluster | dist.Solo,
        log=print, *, hasher: Callable[[list[str]], "Hashing"] | None = None):
    """Run `target` from `source` into `out` under the protocol above; returns OUT (every process)."""
    t0 = time.perf_counter()
    keep_freed_memory()
    ceiling = memory_ceiling(opts.max_memory)
    estimate = fit_memory(target, ceiling, opts.check_space)
    # what malloc keeps for reuse stays under the ceiling too (and reads' own blocks go back when freed)
    retain_freed_memory_up_to(ceiling - estimate, return_large=target.memory.transient > 0)
    output = open_output(out, fingerprint=target.fingerprint() | {"source_files": source.sizes()},
                         overwrite=opts.overwrite, resume=opts.resume, source=source.root,
                         need_bytes=sum(u.nbytes for u in target.units) if opts.check_space else 0, log=log)
    cluster.agree_on(output.fingerprint, source.config_raw, out=str(output.out))
    mine = cluster.my_share([u.nbytes for u in target.units], target.groups() if cluster.num_processes > 1 else None)
    units = [u for u, m in zip(target.units, mine) if m]
    files = [f for f, m in zip(source.files(), cluster.my_share([1] * len(source.files()))) if m]
    with cluster.staging(output, target.create) as staged:
        if staged.resumed:          # hash first: continue only onto the same bytes
            with step(f"{target.command}: hashing the source ({len(files)} files) to compare it with the "
                      "interrupted run's", opts.progress):
                hashing = Hashing(known=source.hash(files))
            _same_bytes(staged, hashing.result(), output.out)
        else:
            hashing = hasher(files) if hasher else Hashing(lambda: source.hash(files))
        with progress(sum(u.nbytes for u in units), target.command, opts.progress) as bar:
            journal = Journal(staged, hashing, bar, cluster)
            todo = [u for u in units if not (journal.is_done(u) and target.still_there(staged.path, u))]
            bar.update(sum(u.nbytes for u in units) - sum(u.nbytes for u in todo))
            with threadpool_limits(limits=1, user_api="blas"):    # the target's own threads are the parallelism
                hashes, sizes = target.write(staged.path, todo, journal, bar)
            journal.flush(wait=True)
        merged = cluster.merge_shares(staged, hashes, hashing.result(), sizes)
        if merged is None:          # another process of a distributed run: its share is on disk
            return cluster.finish(None, log, f"{len(units)} of {len(target.units)} units "
                                             f"({sum(u.nbytes for u in units) / 1e9:.3f} GB)")
        hashes, source_files, sizes = merged
        fin = target.finish(staged.path, is_url(staged.path), hashes)
        memory = {"max_memory": ceiling, "estimate": estimate, "parallel": target.parallel,     # not the measured
                  "planned_parallel": target.memory.most, "largest_block": target.memory.largest}  # peak: reproducible
        write_record(staged.path, command=target.command, source_dir=source.root, source_files=source_files,
                     options=target.options(), extra=fin.extra | {"memory": memory}, output_hashes=hashes | fin.hashes,
                     output_sizes=sizes | fin.sizes, pending=fin.pending)
        if fin.commit is not None:
            fin.commit()
        result = staged.commit()
    cluster.finish(result)
    log(f"{target.command}: peak memory {peak_rss() / 1e9:.2f} GB (estimate {estimate / 1e9:.2f} GB, "
        f"--max-memory {ceiling / 1e9:.2f} GB)")
    log(target.summary(result, time.perf_counter() - t0))
    return result


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
