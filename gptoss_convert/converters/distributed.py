"""Multi-process conversion on jax.distributed: one checkpoint written by N processes (hosts).

The processes talk only through the coordination service that `jax.distributed.initialize()`
starts (its key-value store; no collectives, no devices): each process reads, decodes and writes
a disjoint, byte-balanced share of the units of work, and process 0 (the leader) does what must
happen once: it prepares and locks the staging directory, writes the metadata and conversion.json
after everyone is done, and renames the result into place. The result is byte-identical to a
single-process conversion (docs/multihost.md).

Assumptions: every process sees OUT's parent directory as the same shared filesystem (a local
disk for local processes, NFS/Lustre/GCSFuse-with-rename... across hosts), or OUT is one bucket
prefix all of them can write (to-orbax to gs:// or s3://: disjoint chunk objects, one journal
object per unit, the leader's commit marker last), and the same source (checked: arguments and
source files are compared before any work).

Failure handling: every wait for another process is bounded (`timeout_s`); a process that fails
posts its error and the others stop with it; a process that dies stops heartbeating and the
others stop once they next wait for it (`heartbeat_s`). Nothing commits unless every process
finished its share, and every finished unit is journaled, so `--resume` on all processes
finishes the job. If the leader (which hosts the coordination service) dies, JAX itself
terminates the others ("the leader task was preempted/died").
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import itertools
import json
import threading
import time
from pathlib import Path

from gptoss_convert.converters.provenance import PROGRESS
from gptoss_convert.buffers import keep_freed_memory
from gptoss_convert.errors import ConvertError, InputError, OutputError

DEFAULT_TIMEOUT_S = 3600.0      # the longest one process waits for the others at one point
DEFAULT_HEARTBEAT_S = 60.0      # a process silent this long is taken as dead
_KV = "gptoss/"
_POLL_S = 0.1
_BYE_S = 30.0                   # how long the leader waits for the others to disconnect


class ClusterError(ConvertError):
    """Another process failed, died or did not come: this one stops too, nothing is committed."""

    exit_code = 3


class _Protocol:
    """The steps of converters/job.py that depend on how many processes share the work; the same
    methods for one process (Solo) and many (Cluster)."""

    process_id, num_processes = 0, 1

    @property
    def leader(self) -> bool:
        return self.process_id == 0

    def agree_on(self, fingerprint: dict, config: dict, **more) -> None:
        """agree() on the staging fingerprint, the source's config.json and `more` (OUT, flags)."""
        if self.num_processes > 1:
            digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
            agree(self, {**fingerprint, "config.json": digest, **more})

    def my_share(self, sizes: list[int], groups: list[int | None] | None = None) -> list[bool]:
        """For each unit (by size), whether this process does it (all, alone)."""
        if self.num_processes == 1:
            return [True] * len(sizes)
        groups = [i if g is None else g for i, g in enumerate(groups or [None] * len(sizes))]
        return [o == self.process_id for o in balance(sizes, groups, self.num_processes)]

    @contextlib.contextmanager
    def staging(self, output, prepare):
        """Enter `output` (the leader, or alone) or join it once the leader has, and run
        `prepare(path, first, resumed)` before any process writes: first=True once (create what
        all share, clean up after a crash), then on every other process."""
        if self.leader:
            with output:
                prepare(output.path, True, output.resumed)
                if self.num_processes > 1:
                    self.publish("staged", json.dumps({"resumed": output.resumed}))
                yield output
            return
        info = json.loads(self.leader_says("staged"))
        output.join(f"journal-{self.process_id}", info["resumed"])
        prepare(output.path, False, output.resumed)
        yield output

    def all_hashed(self) -> bool:
        """Whether every process has hashed its share of the source (this one has)."""
        if self.num_processes == 1:
            return True
        self.publish("hashed")
        return len(self._dir("hashed")) == self.num_processes

    def wait_all_hashed(self) -> None:
        if self.num_processes > 1:
            self.gather("hashed")

    def merge_shares(self, staged, outputs: dict, sources: dict, sizes: dict) -> tuple[dict, dict, dict] | None:
        """After this process's work: (all output hashes, all source hashes, all output sizes) on
        the leader (or alone); None on the others, which are done."""
        if self.num_processes == 1:
            return outputs, sources, sizes
        save_share(self, staged, {"outputs": outputs, "sources": sources, "sizes": sizes})
        self.work_done()
        if not self.leader:
            return None
        for share in load_shares(self, staged):
            outputs, sources, sizes = outputs | share["outputs"], sources | share["sources"], sizes | share["sizes"]
        return outputs, sources, sizes

    def finish(self, result, log=print, did: str = ""):
        """The leader announces the commit; the others wait for it (and say what they `did`).
        Returns OUT on every process."""
        if self.num_processes == 1:
            return result
        if self.leader:
            self.publish("committed", str(result))
            return result
        from gptoss_convert.io.location import resolve

        out = resolve(self.leader_says("committed"))      # a Path, or a Location for gs:// and s3://
        log(f"process {self.process_id} of {self.num_processes}: wrote {did}; process 0 committed {out}")
        return out


class Solo(_Protocol):
    """One process alone: every unit is its own, nothing to agree on or wait for."""


class Cluster(_Protocol):
    """This process's view of a jax.distributed job: who it is, and bounded waits on the others
    through the coordination service's key-value store."""

    def __init__(self, client, process_id: int, num_processes: int, *, timeout_s: float, heartbeat_s: float):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self._seen: dict[int, tuple[str | None, float]] = {}       # process -> (its last heartbeat, when seen)
        self.failed: str | None = None          # another process's error, as seen by the heartbeat
        self._interruptible = True              # until every share is written (the commit is never cut)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="gptoss-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        n = 0
        while not self._stop.wait(min(1.0, self.heartbeat_s / 4)):
            n += 1
            with contextlib.suppress(Exception):   # the service going away is noticed by the waits
                self.client.key_value_set(f"{_KV}alive/{self.process_id}", str(n), allow_overwrite=True)
                self._interrupt_on_error()

    def _interrupt_on_error(self) -> None:
        """Stop this process's work as soon as another process has failed, instead of at its
        next wait (a whole share later; and the leader stops the service soon after failing)."""
        failed = self._failure()
        with self._lock:
            if failed and self._interruptible and self.failed is None and not self._stop.is_set():
                self.failed = failed
                _thread.interrupt_main()

    def work_done(self) -> None:
        """Every share is on disk: from now on another process's error no longer interrupts this
        one (an interrupt already sent arrives before the caller's next step)."""
        with self._lock:
            self._interruptible = False            # a KeyboardInterrupt, turned into ClusterError by session()

    def publish(self, name: str, value: str = "") -> None:
        """Post this process's `value` under `name`."""
        self.client.key_value_set(f"{_KV}{name}/{self.process_id}", value, allow_overwrite=True)

    def gather(self, name: str, value: str = "") -> list[str]:
        """Post `value` under `name` and wait until every process has: their values, by process."""
        self.publish(name, value)
        got = self._wait(lambda: self._dir(name) if len(self._dir(name)) == self.num_processes else None,
                         f"every process to reach '{name}'")
        return [got[p] for p in range(self.num_processes)]

    def leader_says(self, name: str) -> str:
        """Wait for the leader's value under `name`."""
        return self._wait(lambda: self._dir(name).get(0), f"process 0 to reach '{name}'")

    def _dir(self, name: str) -> dict[int, str]:
        prefix = f"{_KV}{name}/"
        return {int(k[len(prefix):]): v for k, v in self.client.key_value_dir_get(prefix)}

    def _wait(self, ready, what: str):
        """Poll `ready()` until it returns something, raising ClusterError if another process
        failed or went silent, or after timeout_s."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            got = ready()
            if got is not None:
                return got
            failed = self._failure()
            if failed:
                raise ClusterError(failed)
            self._check_alive(what)
            if time.monotonic() > deadline:
                raise ClusterError(f"waited {self.timeout_s:.0f} s for {what}; stopped without committing; "
                                   "rerun the same command with --resume on every process "
                                   "(or raise --distributed-timeout)")
            time.sleep(_POLL_S)

    def _failure(self) -> str | None:
        """What to say if another process has posted an error."""
        failed = self._dir("error")
        if not failed:
            return None
        p, msg = min(failed.items())
        return (f"process {p} failed ({msg}); stopped without committing; fix that and rerun the same command "
                "with --resume on every process")

    def silent(self) -> list[int]:
        """The other processes whose heartbeat has not changed for heartbeat_s."""
        now, beats = time.monotonic(), self._dir("alive")
        out = []
        for p in range(self.num_processes):
            if p == self.process_id:
                continue
            last = self._seen.get(p)
            if last is None or last[0] != beats.get(p):
                self._seen[p] = (beats.get(p), now)
            elif now - last[1] > self.heartbeat_s:
                out.append(p)
        return out

    def _check_alive(self, what: str) -> None:
        dead = self.silent()
        if dead:
            raise ClusterError(f"process {dead[0]} stopped responding (no heartbeat for {self.heartbeat_s:.0f} s) "
                               f"while this one waited for {what}; stopped without committing; rerun the same "
                               "command with --resume on every process")

    def fail(self, message: str) -> None:
        """Tell the others this process failed (they stop at their next wait)."""
        with contextlib.suppress(Exception):
            self.publish("error", message)

    def close(self) -> None:
        """Leave the job. The leader, which hosts the service, first waits (bounded) until every
        other process has disconnected or gone silent: a process that loses the service while
        still connected is aborted by JAX."""
        self._stop.set()
        # The heartbeat thread must be out of the client before shutdown() destroys it: a call in
        # flight then throws inside C++ and aborts the process (seen: rc -6 after a good run).
        self._beat.join(timeout=_BYE_S)
        with contextlib.suppress(Exception):
            deadline = time.monotonic() + _BYE_S
            everyone = list(range(self.num_processes))
            while self.leader and time.monotonic() < deadline:
                if set(self.client.get_live_nodes(everyone)) - set(self.silent()) <= {0}:
                    break
                time.sleep(_POLL_S)
        import jax

        with contextlib.suppress(Exception):
            jax.distributed.shutdown()


def connect(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            *, timeout_s: float = DEFAULT_TIMEOUT_S, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> Cluster:
    """jax.distributed.initialize() (auto-detected on TPU VMs, GKE, SLURM; or the arguments; or
    JAX's JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID) and this process's Cluster."""
    import jax
    from jax._src import distributed as jax_distributed   # the client: the service's key-value store

    # A process that dies must not take the others down with it (JAX's default): they stop by
    # themselves, with an error saying which process died, at their next bounded wait.
    jax.config.update("jax_enable_recoverability", True)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=max(1, int(min(timeout_s, 300))),
                                   heartbeat_timeout_seconds=max(1, int(heartbeat_s)))
    except Exception as e:  # noqa: BLE001 - JAX raises ValueError/RuntimeError/its own errors
        msg = " ".join(str(e).split())[:300]
        raise InputError(f"jax.distributed.initialize failed ({type(e).__name__}: {msg}); on a cluster JAX does "
                         "not detect, pass --coordinator-address HOST:PORT, --num-processes and --process-id") from None
    return Cluster(jax_distributed.global_state.client, jax.process_index(), jax.process_count(),
                   timeout_s=timeout_s, heartbeat_s=heartbeat_s)


@contextlib.contextmanager
def session(coordinator_address=None, num_processes=None, process_id=None, *, timeout_s=DEFAULT_TIMEOUT_S,
            heartbeat_s=DEFAULT_HEARTBEAT_S):
    """connect(), then: an error in this process is posted for the others; always close()."""
    cluster = connect(coordinator_address, num_processes, process_id, timeout_s=timeout_s, heartbeat_s=heartbeat_s)
    try:
        yield cluster
    except KeyboardInterrupt:
        if cluster.failed:                          # another process failed: say so, not "interrupted"
            raise ClusterError(cluster.failed) from None
        cluster.fail("interrupted")
        raise
    except BaseException as e:
        if not isinstance(e, ClusterError):         # the others know already
            one = e.one_line() if isinstance(e, ConvertError) else " ".join(f"{type(e).__name__}: {e}".split())
            cluster.fail(one[:2000])
        raise
    finally:
        cluster.close()


def _difference(mine, theirs, path: str = "") -> str | None:
    """The first place two fingerprints differ, as 'path: a vs b'."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for k in sorted(set(mine) | set(theirs)):
            d = _difference(mine.get(k), theirs.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if mine == theirs else f"{path}: {json.dumps(theirs)} there, {json.dumps(mine)} here"


def agree(cluster: Cluster, fingerprint: dict) -> None:
    """Check that every process was given the same command, options and source; refuse naming
    the first difference otherwise (every process does, so none is left waiting)."""
    mine = json.loads(json.dumps(fingerprint))
    for p, value in enumerate(cluster.gather("fingerprint", json.dumps(mine, sort_keys=True))):
        d = _difference(mine, json.loads(value))
        if d:
            raise InputError(f"process {p} was started differently from process {cluster.process_id} ({d}); "
                             "start every process with the same arguments and the same source")


def balance(sizes: list[int], groups: list[int], n: int) -> list[int]:
    """Assign units to n processes, balanced by bytes: units in one group stay together (they
    share an output chunk); the largest groups first, each to the least-loaded process. Returns
    each unit's process; the same on every process (deterministic)."""
    totals: dict[int, int] = {}
    for size, g in zip(sizes, groups):
        totals[g] = totals.get(g, 0) + size
    load, owner = [0] * n, {}
    for g in sorted(totals, key=lambda g: (-totals[g], g)):
        p = min(range(n), key=lambda p: (load[p], p))
        owner[g], load[p] = p, load[p] + totals[g]
    return [owner[g] for g in groups]


def shared_chunk_groups(writes: list[list[tuple[str, tuple[slice, ...]]]],
                        chunk_shapes: dict[str, tuple[int, ...]]) -> list[int]:
    """For each unit (the (target leaf, index) pairs it writes), a group id; units that write
    into one output chunk share a group (two processes must never write one chunk file)."""
    parent = list(range(len(writes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for i, unit in enumerate(writes):
        for target, index in unit:
            c = chunk_shapes[target]
            spans = [range(s.start // k, -(-s.stop // k)) for s, k in zip(index, c)]
            for cell in itertools.product(*spans):
                j = first.setdefault((target, cell), i)
                parent[root(i)] = root(j)
    return [root(i) for i in range(len(writes))]


def save_share(cluster: Cluster, staged, share: dict) -> None:
    """Write this process's results (hashes) beside the journal, then wait until every process
    has (the shared filesystem or bucket carries them; the key-value store carries small values
    only)."""
    path = staged.path / PROGRESS / f"share-{cluster.process_id}.json"
    if isinstance(path, Path):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(share))
        tmp.replace(path)
    else:                                   # an object store: one PUT is atomic
        path.write_text(json.dumps(share))
    cluster.gather("written")


def load_shares(cluster: Cluster, staged) -> list[dict]:
    """Every process's share (leader, after save_share)."""
    shares = []
    for p in range(cluster.num_processes):
        f = staged.path / PROGRESS / f"share-{p}.json"
        if not f.is_file():
            raise OutputError(f"{f}: process {p}'s results are not there; do all processes see the same "
                              f"filesystem at {staged.path.parent}?")
        shares.append(json.loads(f.read_text()))
    return shares


def distributable(fn):
    """Give converter `fn` (which takes `cluster=`) the multi-process options: with
    `distributed=True` it runs inside a session(), else with a Solo cluster."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, distributed: bool = False, coordinator_address: str | None = None,
                num_processes: int | None = None, process_id: int | None = None,
                distributed_timeout: float = DEFAULT_TIMEOUT_S, heartbeat_timeout: float = DEFAULT_HEARTBEAT_S,
                **kwargs):
        keep_freed_memory()     # before anything starts threads (TensorStore's take an arena each otherwise)
        if not distributed:
            return fn(*args, cluster=Solo(), **kwargs)
        with session(coordinator_address, num_processes, process_id, timeout_s=distributed_timeout,
                     heartbeat_s=heartbeat_timeout) as cluster:
            return fn(*args, cluster=cluster, **kwargs)
    return wrapper



