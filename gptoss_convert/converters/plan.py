"""The conversion plan: every target block with its source rows and transforms, checked whole
before a single tensor byte is read (docs/design.md §2: target-driven, strict, all problems at once)."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterable, Iterator, Sequence

from gptoss_convert.errors import PlanError
from gptoss_convert.mapping.layout import SCAN_AXIS, Layout
from gptoss_convert.mapping.rules import Rule
from gptoss_convert.mapping.transforms import InsertAxis, TakeInterleaved, Transform, out_axis, out_shape

DEFAULT_BLOCK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Edge:
    """One source tensor feeding one target leaf (or one stack slot of it, or one expert of it)."""

    source: str
    target: str
    transforms: tuple[Transform, ...] = ()
    slot: int | None = None
    rows_per_block: int | None = None
    expert: int | None = None        # fills slice `expert` of the leaf's axis 0 (a per-expert source)


@dataclasses.dataclass(frozen=True)
class Emit:
    target: str
    index: tuple[slice, ...]
    transforms: tuple[Transform, ...]
    slot: int | None


@dataclasses.dataclass(frozen=True)
class ReadBlock:
    """Rows `rows` of source `source` (None = whole tensor), written to every emit."""

    source: str
    rows: slice | None
    emits: tuple[Emit, ...]
    nbytes: int                               # of the source block at the output itemsize

    @property
    def key(self) -> str:
        r = "all" if self.rows is None else f"{self.rows.start}:{self.rows.stop}"
        return f"{self.source}[{r}]"

    @property
    def parts(self) -> int | None:
        """n when every emit starts by taking one of n interleaved parts of the last axis (the
        gate/up split): the source is then read as its n parts (HFCheckpoint.read_parts), each
        decoded contiguous from its own stored rows, instead of as strided views of the whole."""
        firsts = [e.transforms[0] if e.transforms else None for e in self.emits]
        if firsts and all(isinstance(t, TakeInterleaved) for t in firsts) and len({t.parts for t in firsts}) == 1:
            return firsts[0].parts
        return None


@dataclasses.dataclass
class Plan:
    targets: dict[str, tuple[int, ...]]
    edges: list[Edge]
    blocks: list[ReadBlock]
    itemsize: int

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) for s in self.targets.values()) * self.itemsize

    def chunk_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per target, the shape of the largest block written to it (a natural storage chunk);
        one pass over the blocks."""
        best: dict[str, tuple[int, ...]] = {}
        for b in self.blocks:
            for e in b.emits:
                shape = tuple(s.stop - s.start for s in e.index)
                if e.target not in best or math.prod(shape) > math.prod(best[e.target]):
                    best[e.target] = shape
        return best

    def describe(self, sources: dict[str, tuple[tuple[int, ...], str]]) -> str:
        """Human-readable plan: target <- source, transforms, shape, bytes."""
        by_target: dict[str, list[Edge]] = collections.defaultdict(list)
        for e in self.edges:
            by_target[e.target].append(e)
        nblocks = collections.Counter(em.target for b in self.blocks for em in b.emits)
        lines = []
        for t, shape in self.targets.items():
            es = by_target[t]
            src = es[0]
            ops = ", ".join(map(str, src.transforms)) or "copy"
            more = ""
            if len(es) > 1:   # several layers (stacked at the scan axis) and/or experts (at axis 0)
                parts = [f"{n} {what}" for n, what in ((len({e.slot for e in es}), f"layers at axis {SCAN_AXIS}"),
                                                      (len({e.expert for e in es}), "experts at axis 0")) if n > 1]
                more = f" (+{len(es) - 1} more: {' x '.join(parts)})"
            lines.append(f"{t} {list(shape)} {math.prod(shape) * self.itemsize:,} B <- {src.source} "
                         f"{list(sources[src.source][0])} {sources[src.source][1]} | {ops}{more} | "
                         f"{nblocks[t]} block(s)")
        lines.append(f"{len(self.targets)} target leaves, {len(self.blocks)} read blocks, "
                     f"{self.total_bytes:,} bytes to write")
        return "\n".join(lines)


class RuleEdges(Sequence):
    """The edges of a mapping table over `num_layers` layers, counted without expanding them
    (`len`, `sources_needed`: arithmetic on the rules) and expanded on first use. build_plan
    compares the counts with the source's tensors first, so a config.json that declares far more
    layers or experts than the files hold is refused before millions of edges are built."""

    def __init__(self, rules: Iterable[Rule], num_layers: int, layout: Layout | None):
        self.rules, self.num_layers, self.layout = list(rules), num_layers, layout
        self._edges: list[Edge] | None = None

    def _copies(self, r: Rule) -> int:
        return (r.experts or 1) * (self.num_layers if r.per_layer else 1)

    def __len__(self) -> int:
        return sum(len(r.per_target()) * self._copies(r) for r in self.rules)

    @property
    def sources_needed(self) -> int:
        """How many distinct source tensors the expanded edges name."""
        distinct = {(r.hf, r.experts, r.per_layer): self._copies(r) for r in self.rules}
        return sum(distinct.values())

    def expanded(self) -> list[Edge]:
        """The edges as a list (built once)."""
        if self._edges is None:
            self._edges = list(_expand(self.rules, self.num_layers, self.layout))
        return self._edges

    def __getitem__(self, i):
        return self.expanded()[i]

    def __iter__(self) -> Iterator[Edge]:
        return iter(self.expanded())

    def __add__(self, other) -> list[Edge]:
        return self.expanded() + list(other)


def edges_from_rules(rules: Iterable[Rule], num_layers: int, layout: Layout | None) -> RuleEdges:
    """Expand a mapping table over layers and experts (one edge per target) and place each
    layer's leaf with `layout`; lazily (RuleEdges), so the plan can be bounded first."""
    return RuleEdges(rules, num_layers, layout)


def _expand(rules: Iterable[Rule], num_layers: int, layout: Layout | None) -> Iterator[Edge]:
    for r in rules:
        for hf, target, transforms in r.per_target():
            for j in [None] if r.experts is None else range(r.experts):
                src = hf if j is None else hf.replace("{j}", str(j))
                if not r.per_layer:
                    yield Edge(src, target, transforms, None, r.rows_per_block, j)
                    continue
                for i in range(num_layers):
                    if layout is None:
                        yield Edge(src.format(i=i), target.format(i=i), transforms, None, r.rows_per_block, j)
                    else:
                        p = layout.place(i, target, ())
                        yield Edge(src.format(i=i), p.path, transforms, p.slot, r.rows_per_block, j)


# A plan is expanded (and checked edge by edge, naming each problem) only while the config's
# sizes stay within this factor (+ BOUND_SLACK tensors) of what the files hold; beyond, the sizes
# alone refuse it. So the work and memory of planning are linear in the files, whatever the config.
BOUND_FACTOR = 2
BOUND_SLACK = 64


def check_bounds(sources: dict[str, tuple[tuple[int, ...], str]], targets: dict[str, tuple[int, ...]],
                 edges) -> list[str]:
    """What the config declares against what the files hold, by arithmetic alone (nothing is
    expanded): the distinct source tensors the rules name, and the elements the targets need
    (every target element comes from one source element). [] when they are within
    BOUND_FACTOR of each other (smaller differences are named tensor by tensor by the plan)."""
    problems = []
    needed = getattr(edges, "sources_needed", None)
    if needed is not None and needed > BOUND_FACTOR * len(sources) + BOUND_SLACK:
        problems.append(f"config.json's sizes need {needed:,} source tensors but the checkpoint holds "
                        f"{len(sources):,} (num_hidden_layers / experts larger than the files)")
    want = sum(math.prod(s) for s in targets.values())
    have = sum(math.prod(shape) for shape, _ in sources.values())
    if want > BOUND_FACTOR * have:
        problems.append(f"config.json's sizes need {want:,} parameters but the checkpoint's tensors hold "
                        f"{have:,} (a config that does not belong to these files)")
    return problems


def _leaf_axis(axis: int, slot: int | None) -> int:
    return axis if slot is None or axis < SCAN_AXIS else axis + 1


def _unstacked(shape: tuple[int, ...], slot: int | None, expert: int | None = None) -> tuple[int, ...]:
    """What one edge fills of a leaf of `shape`: less the stack axis (slot) and the expert axis."""
    shape = shape if slot is None else shape[:SCAN_AXIS] + shape[SCAN_AXIS + 1:]
    return shape if expert is None else shape[1:]


def _where(e: Edge) -> str:
    return (e.target + ("" if e.slot is None else f" slot {e.slot}")
            + ("" if e.expert is None else f" expert {e.expert}"))


def _check(sources, targets, edges) -> list[str]:
    problems = []
    used: dict[str, list[Edge]] = collections.defaultdict(list)
    filled: collections.Counter = collections.Counter()
    for e in edges:
        used[e.source].append(e)
        filled[(e.target, e.slot, e.expert)] += 1
        if e.source not in sources:
            problems.append(f"HF tensor {e.source!r} is missing (needed for {_where(e)})")
            continue
        if e.target not in targets:
            problems.append(f"{e.target} (from {e.source!r}) is not a leaf of the parameter tree")
            continue
        want = targets[e.target]
        if e.slot is not None and not (len(want) > SCAN_AXIS and 0 <= e.slot < want[SCAN_AXIS]):
            problems.append(f"{e.target}: stack slot {e.slot} out of range for shape {list(want)}")
            continue
        if e.expert is not None and not (want and 0 <= e.expert < want[0]):
            problems.append(f"{e.target}: expert {e.expert} out of range for shape {list(want)} "
                            "(shapes disagree with config.json)")
            continue
        try:
            got = out_shape(e.transforms, sources[e.source][0])
        except ValueError as err:
            problems.append(f"HF tensor {e.source!r} {list(sources[e.source][0])} cannot map to {e.target}: {err}")
            continue
        if got != _unstacked(want, e.slot, e.expert):
            per = " and ".join(w for w, v in (("stack slot", e.slot), ("expert", e.expert)) if v is not None)
            problems.append(f"HF tensor {e.source!r} {list(sources[e.source][0])} gives {list(got)} but {e.target} "
                            f"needs {list(_unstacked(want, e.slot, e.expert))}{' per ' + per if per else ''} "
                            "(shapes disagree with config.json)")
    problems += [f"HF tensor {s!r} is not used by any target (unexpected tensor)" for s in sources if s not in used]
    for s, es in used.items():
        parts = sorted((t.part, t.parts) for e in es for t in e.transforms if isinstance(t, TakeInterleaved))
        if len(es) > 1 and parts != [(p, len(es)) for p in range(len(es))]:
            problems.append(f"HF tensor {s!r} is used {len(es)} times ({', '.join(e.target for e in es)}) "
                            "without splitting it into disjoint parts")
    stacked = {e.target for e in edges if e.slot is not None}
    per_expert = {e.target for e in edges if e.expert is not None}
    for t, shape in targets.items():
        for slot in range(shape[SCAN_AXIS]) if t in stacked else [None]:
            for j in range(shape[0]) if t in per_expert else [None]:
                if (n := filled[(t, slot, j)]) != 1:
                    problems.append(f"{_where(Edge('', t, slot=slot, expert=j))} is filled {n} times "
                                    "(must be exactly once)")
    return problems


def build_plan(sources: dict[str, tuple[tuple[int, ...], str]], targets: dict[str, tuple[int, ...]],
               edges: list[Edge], *, itemsize: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Plan:
    """Check `edges` against `sources` ({name: (shape, dtype)}) and `targets` ({path: shape}),
    then cut each source into read blocks. Raises PlanError listing every problem. Sizes are
    compared first (check_bounds): a config far larger than the files is refused before a
    single edge is expanded."""
    if bounds := check_bounds(sources, targets, edges):
        raise PlanError(bounds, header="config.json does not fit the checkpoint's files")
    problems = _check(sources, targets, edges)
    if problems:
        raise PlanError(problems)
    by_source: dict[str, list[Edge]] = collections.defaultdict(list)
    for e in edges:
        by_source[e.source].append(e)
    blocks = []
    for s, es in by_source.items():
        blocks += _blocks(s, sources[s][0], es, targets, itemsize, block_bytes)
    return Plan(dict(targets), list(edges), blocks, itemsize)


def _blocks(source, shape, edges, targets, itemsize, block_bytes) -> list[ReadBlock]:
    row_axes = [out_axis(e.transforms, 0, shape) if shape else None for e in edges]
    nbytes = math.prod(shape) * itemsize
    if not shape or None in row_axes or shape[0] <= 1:
        rows_per = None
    else:
        declared = [e.rows_per_block for e in edges if e.rows_per_block]
        rows_per = min(declared) if declared else max(1, block_bytes // max(1, nbytes // shape[0]))
        if rows_per >= shape[0]:
            rows_per = None
    starts = [None] if rows_per is None else range(0, shape[0], rows_per)
    out = []
    for r0 in starts:
        rows = None if r0 is None else slice(r0, min(r0 + rows_per, shape[0]))
        emits = []
        for e, ax in zip(edges, row_axes):
            full = targets[e.target]
            index = [slice(0, d) for d in full]
            transforms = e.transforms
            if e.expert is not None:      # one expert's tensor is the [1, ...] slice at e.expert of axis 0
                index[0] = slice(e.expert, e.expert + 1)
                transforms, ax = transforms + (InsertAxis(0),), (None if ax is None else ax + 1)
            if e.slot is not None:
                index[SCAN_AXIS] = slice(e.slot, e.slot + 1)
            if rows is not None:
                index[_leaf_axis(ax, e.slot)] = slice(rows.start, rows.stop)
            emits.append(Emit(e.target, tuple(index), transforms, e.slot))
        n = nbytes if rows is None else nbytes // shape[0] * (rows.stop - rows.start)
        out.append(ReadBlock(source, rows, tuple(emits), n))
    return out
