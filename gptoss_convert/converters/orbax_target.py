"""The Orbax target: a MaxText params checkpoint at OUT/0/items, written block by block.

Used by to-orbax from an HF source and by the relayout from an Orbax source: each supplies a
`BlockPlan` (the blocks, how one is read, where it lands); this module owns the writer, the
bounded in-flight writes and what the leader writes last (sidecars, Orbax metadata, markers).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Protocol

import numpy as np

from gptoss_convert import faults
from gptoss_convert.buffers import RecyclingPool
from gptoss_convert.converters.job import Finished, Memory, Unit
from gptoss_convert.converters.stream import prefetch

STEP = "0"              # where to-orbax puts its one step: OUT/0/items
ITEM = "items"
MAX_IN_FLIGHT = 4       # blocks whose writes may be pending at once (overlaps I/O with decoding), at most
KNOWN_MODELS = {(24, 32): "gpt-oss-20b", (36, 128): "gpt-oss-120b"}


def maxtext_flags(out, scanned: bool, cfg) -> str:
    """The MaxText flags that load the Orbax checkpoint at `out`."""
    name = KNOWN_MODELS.get((cfg.L, cfg.E))
    flags = f"load_parameters_path={out}/{STEP}/{ITEM} scan_layers={str(scanned).lower()}"
    return (f"model_name={name} " if name else "") + flags


class BlockPlan(Protocol):
    """The blocks of one Orbax conversion: each has `.key` and `.nbytes`."""

    blocks: list
    transient_blocks: int       # blocks one read allocates outside the pools (freed once it returns)

    def read(self, block, alloc) -> object: ...
    def emit(self, writer, block, x) -> list: ...
    def writes(self, block) -> list[tuple[str, tuple[slice, ...]]]: ...


@dataclasses.dataclass
class OrbaxTarget:
    """Job target writing `leaves` {path: shape} as `dtype` (chunked by `chunk_shapes`) from `plan`."""

    plan: BlockPlan
    leaves: dict[str, tuple[int, ...]]
    chunk_shapes: dict[str, tuple[int, ...]]
    dtype: np.dtype
    custom_metadata: dict
    compression: str | None
    recorded: dict                              # options in conversion.json (and the fingerprint)
    extra: dict                                 # further record fields
    sidecars: Callable[[object], None]          # writes config.json and the tokenizer files into OUT
    summary_of: Callable[[object, float], str]
    identity: dict = dataclasses.field(default_factory=dict)    # fingerprint fields beyond `recorded`
    command: str = "to-orbax"

    def __post_init__(self):
        """Units from the blocks; memory: with `parallel` blocks whose writes are in flight (at most
        MAX_IN_FLIGHT; job.fit_memory lowers it under --max-memory), 2 read ahead and 1 being
        decoded, and as many again that RecyclingPool keeps mapped for reuse; plus what one read
        allocates outside the pools (the plan's transient_blocks)."""
        self.largest_block = max((b.nbytes for b in self.plan.blocks), default=0)
        self.memory = Memory(self.largest_block, MAX_IN_FLIGHT, per=2, fixed=2 * 3,
                             transient=self.plan.transient_blocks)
        self.parallel = MAX_IN_FLIGHT
        reads = getattr(self.plan, "block_reads", None) or {}      # what each block reads, where the plan knows
        self.units = [Unit(b.key, b.nbytes, reads.get(b.key)) for b in self.plan.blocks]
        self._blocks = {b.key: b for b in self.plan.blocks}
        self.writer = None

    def groups(self) -> list[int]:
        """Each unit's chunk group: units sharing an output chunk go to one process."""
        from gptoss_convert.converters.distributed import shared_chunk_groups

        return shared_chunk_groups([self.plan.writes(b) for b in self.plan.blocks], self.chunk_shapes)

    def still_there(self, path, unit: Unit) -> bool:
        """Journaled blocks are trusted (the writer reopens the arrays; torn chunk writes are removed)."""
        return True

    def fingerprint(self) -> dict:
        return {"command": self.command, **self.recorded, **self.identity}

    def options(self) -> dict:
        return dict(self.recorded)

    def create(self, path, first: bool, resumed: bool) -> None:
        """Create (or reopen) the arrays; the first process of a resumed run also removes the
        chunk writes the interrupted run left unfinished (no other process writes yet)."""
        from gptoss_convert.io.orbax_writer import OrbaxWriter

        self.writer = OrbaxWriter(path / STEP, {p: (s, self.dtype) for p, s in self.leaves.items()},
                                  chunk_shapes=self.chunk_shapes, custom_metadata=self.custom_metadata,
                                  compression=self.compression)
        self.writer.create()
        if first and resumed:
            self.writer.remove_temporaries()

    def write(self, path, units: list[Unit], journal, bar) -> tuple[dict, dict]:
        """Write every block of `units`, journaling each once its writes are stored; returns the
        chunk files' (hashes, sizes) relative to `path`."""
        try:
            self._stream([self._blocks[u.key] for u in units], journal)
        finally:
            self.writer.close()
        return self._rel(path, self.writer.chunk_hashes()), self._rel(path, self.writer.chunk_sizes())

    @staticmethod
    def _rel(path, d: dict) -> dict:
        return {p.relative_to(path).as_posix(): v for p, v in d.items()}

    def _stream(self, blocks: list, journal) -> None:
        pool = RecyclingPool(keep=self.parallel + 3)    # a block's memory comes back when TensorStore lets go of it
        in_flight: collections.deque = collections.deque()      # (block, its pending writes)

        def retire(n: int) -> None:
            """Wait for all but `n` blocks' writes to be stored, journaling each one done."""
            while len(in_flight) > n:
                done, futures = in_flight.popleft()
                for f in futures:
                    f.result()
                faults.point("write")
                journal.done(Unit(done.key, done.nbytes))

        for block, x in prefetch(blocks, lambda b: self.plan.read(b, pool.empty)):
            faults.point("read")
            in_flight.append((block, self.plan.emit(self.writer, block, x)))
            retire(self.parallel)
        retire(0)

    def finish(self, path, remote: bool, hashes: dict) -> Finished:
        """Sidecars, then Orbax's metadata (and, on a bucket, its commit marker after the record)."""
        self.sidecars(path)         # the Orbax tree does not say which model it is: verify/generate read these
        self.writer.finalize(commit=not remote)
        pending = None
        if remote:
            target, text = self.writer.commit_marker()
            pending = {target.relative_to(path).as_posix(): text.encode()}
        extra = {"leaves": {p: list(s) for p, s in self.leaves.items()}, "maxtext_item": f"{STEP}/{ITEM}", **self.extra}
        return Finished(extra, {}, self._rel(path, self.writer.chunk_sizes()), pending,
                        self.writer.commit if remote else None)

    def summary(self, result, seconds: float) -> str:
        return self.summary_of(result, seconds)
