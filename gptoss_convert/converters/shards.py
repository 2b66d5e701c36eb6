"""The safetensors-shards target: an HF checkpoint directory (shards, index, config, tokenizer).

Used by dequantize (HF -> HF) and to-hf (Orbax -> HF): each supplies its tensors (with their
`entries` and `nbytes`) and how one shard's data is written; this module owns the sharding, the
shard names, the per-shard journal and report, the upload to a bucket and the index.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from gptoss_convert.converters.job import Finished, Memory, Unit
from gptoss_convert.converters.provenance import PROGRESS
from gptoss_convert.io.files import temp_path
from gptoss_convert.io.hf_checkpoint import INDEX
from gptoss_convert.io.location import Location
from gptoss_convert.io.safetensors import build_header

SHARD_METADATA = {"format": "pt"}


def split_shards(tensors: list, max_shard: int) -> list[list]:
    """Consecutive tensors into shards of at most `max_shard` bytes (a larger tensor alone)."""
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def shard_size(tensors: list) -> int:
    """Bytes of a finished shard: length prefix + header + data."""
    prefix, _ = build_header([e for t in tensors for e in t.entries], SHARD_METADATA)
    return len(prefix) + sum(t.nbytes for t in tensors)


@dataclasses.dataclass
class ShardsTarget:
    """Job target writing `tensors` into safetensors shards of at most `max_shard` bytes.

    `write_shard(path, tensors, bar, parallel)` writes one shard file with `parallel` blocks
    read or computed at once and returns (its hash, a report dict); `memory` says what that holds
    (job.fit_memory sets `parallel` under --max-memory); `metadata(out, names, shards)` writes
    config, tokenizer and index files;
    `report(reports)` turns the reports of every shard, in shard order, into record fields."""

    command: str
    tensors: list
    max_shard: int
    write_shard: Callable
    metadata: Callable
    recorded: dict
    summary_of: Callable[[object, float], str]
    report: Callable[[dict], dict] = lambda reports: {}
    extra: dict = dataclasses.field(default_factory=dict)
    memory: Memory = Memory(0, 1, 0, 0)
    reads_of: Callable[[list], frozenset[str]] | None = None    # the source files a shard reads, where known
    shared_reads: list[str] = dataclasses.field(default_factory=list)  # of those, the ones every shard reads

    def __post_init__(self):
        self.shards = split_shards(self.tensors, self.max_shard)
        self.names = shard_names(len(self.shards))
        self._by_name = dict(zip(self.names, self.shards))
        self.units = [Unit(n, sum(t.nbytes for t in s), self.reads_of(s) if self.reads_of else None)
                      for n, s in zip(self.names, self.shards)]
        self.finished: dict = {}                # the record fields finish() wrote (its report's too)
        self.parallel = self.memory.most

    def fingerprint(self) -> dict:
        return {"command": self.command, **self.recorded, "shards": [[t.name for t in s] for s in self.shards]}

    def options(self) -> dict:
        return dict(self.recorded)

    def create(self, path, first: bool, resumed: bool) -> None:
        """Nothing is shared between shards."""

    def groups(self) -> None:
        """Every shard is its own file: any process may write any one."""
        return None

    def still_there(self, path, unit: Unit) -> bool:
        """A journaled local shard must still be there whole (not lost or cut short)."""
        f = path / unit.key
        return not isinstance(f, Path) or (f.is_file() and f.stat().st_size == shard_size(self._by_name[unit.key]))

    def write(self, path, units: list[Unit], journal, bar) -> tuple[dict, dict]:
        """Write each shard of `units` to a temporary file, move it into place (a bucket: upload
        it), save its report beside the journal, journal it."""
        hashes, sizes = {}, {}
        for u in units:
            shard, dest = self._by_name[u.key], path / u.key
            local = isinstance(dest, Path)
            tmp = temp_path(dest) if local else Path(tempfile.mkstemp(prefix=".gptoss-shard-")[1])
            try:
                hashes[u.key], rep = self.write_shard(tmp, shard, bar, self.parallel)
                sizes[u.key] = tmp.stat().st_size
                os.replace(tmp, dest) if local else dest.write_bytes(tmp.read_bytes())
            finally:
                if not local:
                    tmp.unlink(missing_ok=True)
            (path / PROGRESS / f"{u.key}.report.json").write_text(json.dumps(rep))
            journal.done(u, counted=True)          # write_shard advanced the bar block by block
        return hashes, sizes

    def finish(self, path, remote: bool, hashes: dict) -> Finished:
        """Every shard's report (in shard order, whichever process wrote it), the metadata files."""
        reports = {k: v for f in self.names
                   for k, v in json.loads((path / PROGRESS / f"{f}.report.json").read_text()).items()}
        self.metadata(path, self.names, self.shards)
        self.finished = self.extra | self.report(reports)
        return Finished(self.finished, {}, {})

    def summary(self, result, seconds: float) -> str:
        return self.summary_of(result, seconds)


def write_index(out, names: list[str], shards: list[list]) -> None:
    """model.safetensors.index.json, when there is more than one shard."""
    if len(names) > 1:
        weight_map = {e[0]: f for f, s in zip(names, shards) for t in s for e in t.entries}
        total = sum(t.nbytes for s in shards for t in s)
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def is_bucket(path) -> bool:
    return isinstance(path, Location)
