"""Orbax I/O: files identical to stock Orbax 0.12.8, restores through MaxText's and Orbax's readers,
block-wise writes, resume, partial and sharded reads, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import xxhash
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint import v1 as ocp1

from gptoss_convert.errors import InputError, OutputError
from gptoss_convert.io.files import TEMP_SUFFIX
from gptoss_convert.io.orbax_reader import load_params, open_leaf, read_metadata
from gptoss_convert.io.orbax_writer import OrbaxWriter, default_chunk_shape
from gptoss_convert.tree import flatten, unflatten

ROOT = Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
WI0 = "decoder/layers/layers_0/GptOssMlp/wi_0"
# A scanned-style tree with distinct sizes: H 6, I 4, E 5, L/2 3, Nq 4, D 2, V 11.
LEAVES = {
    "token_embedder/embedding": ((11, 6), BF16),                                # [V, H]
    "decoder/decoder_norm/scale": ((6,), F32),                                  # [H]
    WI0: ((5, 3, 6, 4), BF16),                                                  # [E, L/2, H, I]
    "decoder/layers/layers_1/GptOssAttention/sinks": ((4, 3), F32),             # [Nq, L/2]
    "decoder/layers/layers_1/GptOssAttention/query/kernel": ((6, 3, 4, 2), BF16),  # [H, L/2, Nq, D]
}
ALL = lambda ndim: (slice(None),) * ndim  # noqa: E731


def make_values(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(s).astype(t) for p, (s, t) in LEAVES.items()}


def write_whole(step_dir: Path, values: dict, **kwargs) -> OrbaxWriter:
    writer = OrbaxWriter(step_dir, {p: (v.shape, v.dtype) for p, v in values.items()},
                         custom_metadata={"scan_layers": True}, **kwargs)
    writer.create()
    for path, value in values.items():
        writer.write(path, ALL(value.ndim), value)
    writer.finalize()
    return writer


def assert_same(got: dict, want: dict) -> None:
    got = flatten(got)
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        g = np.asarray(got[path])
        assert g.shape == value.shape and g.dtype == value.dtype, path
        np.testing.assert_array_equal(g.view(np.uint8), value.view(np.uint8), err_msg=path)


@pytest.fixture(scope="module")
def values():
    return make_values()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, values):
    """<root>/0 written by OrbaxWriter, whole leaves, default (single-chunk) layout."""
    root = tmp_path_factory.mktemp("orbax")
    write_whole(root / "0", values)
    return root


# ---------------------------------------------------------------- format


def test_default_chunk_shape():
    assert default_chunk_shape((5, 3, 6, 4), BF16) == (5, 3, 6, 4)           # small: one chunk
    assert default_chunk_shape((128, 18, 2880, 2880), BF16) == (1, 4, 2880, 2880)  # 120b wi_0: 63 MiB
    assert default_chunk_shape((201088, 2880), BF16) == (11650, 2880)         # rows that fit 64 MiB
    assert default_chunk_shape((4, 64), F32, max_chunk_bytes=100) == (1, 25)  # cuts axis 1 too
    assert default_chunk_shape((0, 7), F32) == (1, 7)                         # zarr needs sizes >= 1
    assert default_chunk_shape((), F32) == ()


def test_files_identical_to_stock_orbax(tmp_path, values):
    """Drift guard: stock Orbax saving the same numpy tree writes byte-identical `_METADATA`,
    zarr.json and chunk files; `_CHECKPOINT_METADATA` differs only in timestamps."""
    stock = ocp.CheckpointManager(tmp_path / "stock", item_names=("items",), item_handlers={
        "items": ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)})
    stock.save(0, args=ocp.args.Composite(items=ocp.args.PyTreeSave({"params": {"params": unflatten(values)}})),
               custom_metadata={"scan_layers": True})
    stock.wait_until_finished()
    write_whole(tmp_path / "ours" / "0", values)

    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(tmp_path / "stock") == files(tmp_path / "ours")
    for rel in files(tmp_path / "ours"):
        a, b = (tmp_path / "stock" / rel).read_bytes(), (tmp_path / "ours" / rel).read_bytes()
        if rel.endswith("_CHECKPOINT_METADATA"):
            a, b = json.loads(a), json.loads(b)
            for meta in (a, b):
                del meta["init_timestamp_nsecs"], meta["commit_timestamp_nsecs"]
        if not rel.endswith("commit_success.txt"):  # free text naming the (temporary) path
            assert a == b, rel


# ---------------------------------------------------------------- readers


def maxtext_context() -> ocp1.Context:
    """What MaxText's checkpoint_context.build_context(use_ocdbt=True, use_zarr3=True,
    checkpoint_storage_concurrent_gb=96, partial_load=True) sets for load_params_from_path."""
    ctx = ocp1.Context()
    ctx.array.saving.use_ocdbt = True  # MaxText's default; the reader detects our non-OCDBT layout
    ctx.array.saving.use_zarr3 = True
    ctx.memory.read_concurrent_bytes = ctx.memory.write_concurrent_bytes = 96 << 30
    ctx.pytree.loading.partial_load = True
    return ctx


def test_maxtext_v1_load(ckpt, values):
    """(a) MaxText 0.2.5 load_params_from_path(<root>/0/items): it strips `items` and calls
    `ocp.load(<root>/0, {"params": abstract_params}, checkpointable_name="items")` with
    `from orbax.checkpoint import v1 as ocp` (0.12.8: orbax.checkpoint.v1.load), partial_load on."""
    step = ckpt / "0"
    meta = ocp1.metadata(step)  # AUTO resolves the only PyTree checkpointable, "items"
    assert meta.custom_metadata == {"scan_layers": True}
    assert ocp1.checkpointables_metadata(step).custom_metadata == {"scan_layers": True}  # MaxText's scan check
    assert ocp1.metadata(step, checkpointable_name="items").metadata == meta.metadata
    shapes = {p: (tuple(m.shape), m.dtype) for p, m in flatten(meta.metadata["params"]["params"]).items()}
    assert shapes == {p: (v.shape, v.dtype) for p, v in values.items()}

    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("fsdp",)), P())
    abstract = {p: jax.ShapeDtypeStruct(v.shape, F32, sharding=sharding) for p, v in values.items()}  # weight_dtype f32
    with maxtext_context():
        full = ocp1.load(step, {"params": {"params": unflatten(abstract)}}, checkpointable_name="items")
        part = ocp1.load(step, {"params": {"params": unflatten({WI0: abstract[WI0]})}}, checkpointable_name="items")
    assert_same(full["params"]["params"], {p: v.astype(F32) for p, v in values.items()})
    assert_same(part["params"]["params"], {WI0: values[WI0].astype(F32)})
    assert isinstance(full["params"]["params"]["decoder"]["decoder_norm"]["scale"], jax.Array)


def test_orbax_v0_readers(ckpt, values):
    """(b) v0 PyTreeCheckpointer on <root>/0/items and CheckpointManager on <root> agree."""
    direct = ocp.PyTreeCheckpointer().restore(ckpt / "0" / "items")
    manager = ocp.CheckpointManager(ckpt, item_names=("items",))
    assert manager.all_steps() == [0]
    via_manager = manager.restore(0, args=ocp.args.Composite(items=ocp.args.PyTreeRestore()))["items"]
    no_args = ocp.CheckpointManager(ckpt).restore(0)["items"]  # handler resolved from _CHECKPOINT_METADATA
    # MaxText before its Orbax v1 move: legacy kwargs, restore_args built from a sharded abstract.
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"params": unflatten({p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                                for p, v in values.items()})}
    legacy = ocp.PyTreeCheckpointer().restore(
        ckpt / "0" / "items", item={"params": abstract}, transforms={},
        restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract)})
    for restored in (direct, via_manager, no_args, legacy):
        assert_same(restored["params"]["params"], values)


def test_read_metadata_and_open_leaf(ckpt, values):
    """(f) metadata without data; a partial read of one expert of one stack slot."""
    meta = read_metadata(ckpt / "0")
    assert meta["custom_metadata"] == {"scan_layers": True}
    assert meta["leaves"] == {p: (v.shape, v.dtype) for p, v in values.items()}
    assert read_metadata(ckpt / "0" / "items") == meta  # MaxText-style path works too
    store = open_leaf(ckpt / "0", WI0)
    np.testing.assert_array_equal(store[3, 1].read().result(), values[WI0][3, 1])
    with pytest.raises(InputError, match="not in the checkpoint"):
        open_leaf(ckpt / "0", "decoder/nope")


@pytest.mark.parametrize("use_zarr3", [True, False])
def test_reader_reads_stock_ocdbt_checkpoint(tmp_path, values, use_zarr3):
    """read_metadata/open_leaf also read what MaxText saves (OCDBT + zarr3) and v0's default (zarr2)."""
    stock = ocp.CheckpointManager(tmp_path, item_names=("items",), item_handlers={
        "items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=use_zarr3)})
    stock.save(0, args=ocp.args.Composite(items=ocp.args.PyTreeSave({"params": {"params": unflatten(values)}})),
               custom_metadata={"scan_layers": False})
    stock.wait_until_finished()
    assert (tmp_path / "0" / "items" / "manifest.ocdbt").is_file()
    assert read_metadata(tmp_path / "0")["custom_metadata"] == {"scan_layers": False}
    np.testing.assert_array_equal(open_leaf(tmp_path / "0", WI0)[2].read().result(), values[WI0][2])


def test_load_params_host(ckpt, values):
    assert_same(load_params(ckpt / "0"), values)
    sub = {WI0: jax.ShapeDtypeStruct((5, 3, 6, 4), BF16)}
    assert_same(load_params(ckpt / "0", unflatten(sub), dtype=np.float32), {WI0: values[WI0].astype(F32)})
    bad = {WI0: jax.ShapeDtypeStruct((5, 3, 4, 6), BF16), "decoder/missing": jax.ShapeDtypeStruct((1,), F32)}
    with pytest.raises(InputError, match=r"2 problem.*wi_0: checkpoint shape.*missing: not in the checkpoint"):
        load_params(ckpt / "0", unflatten(bad))


SHARDED_SCRIPT = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gptoss_convert.io.orbax_reader import load_params, open_leaf, read_metadata
step = {step!r}
assert len(jax.devices()) == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tensor"))
specs = {{"token_embedder/embedding": P(None, "fsdp"), {wi0!r}: P(None, None, "fsdp", "tensor")}}
by_path = lambda path: NamedSharding(mesh, specs.get(path, P()))
leaves = read_metadata(step)["leaves"]
tree_of_shardings = {{}}
for path in leaves:
    node = tree_of_shardings
    *parents, leaf = path.split("/")
    for k in parents:
        node = node.setdefault(k, {{}})
    node[leaf] = by_path(path)
for params in (load_params(step, sharding=by_path), load_params(step, sharding=tree_of_shardings)):
    flat = {{}}
    stack = [("", params)]
    while stack:
        prefix, node = stack.pop()
        for k, v in node.items():
            p = prefix + "/" + k if prefix else k
            stack.append((p, v)) if isinstance(v, dict) else flat.__setitem__(p, v)
    assert sorted(flat) == sorted(leaves)
    for path, arr in flat.items():
        assert isinstance(arr, jax.Array) and arr.sharding == by_path(path), path
        want = open_leaf(step, path).read().result()
        np.testing.assert_array_equal(np.asarray(arr), want)
        for shard in arr.addressable_shards:  # each device holds only its slice
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
wi0 = flat[{wi0!r}]
assert wi0.addressable_shards[0].data.shape == (5, 3, 3, 2), wi0.addressable_shards[0].data.shape
print("OK")
"""


def run_script(source: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    full_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    result = subprocess.run([sys.executable, str(script)], env=full_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_load_params_sharded_on_cpu_mesh(ckpt, tmp_path):
    """(f) Restore straight into NamedShardings on a 2x2 mesh of 4 CPU devices (a subprocess,
    since XLA_FLAGS must be set before jax initialises)."""
    run_script(SHARDED_SCRIPT.format(step=str(ckpt / "0"), wi0=WI0), tmp_path,
               XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")


# ---------------------------------------------------------------- writing


def test_blockwise_writes_with_zero_chunks(tmp_path, values):
    """(c) wi_0 written per (expert, stack slot) into matching chunks, some blocks all zeros, plus
    an all-zero leaf: every chunk file exists and Orbax restores the full arrays."""
    wi0 = values[WI0].copy()
    wi0[1] = 0          # a whole expert of zeros: 3 all-zero chunks
    zeros = np.zeros((6, 3), BF16)
    leaves = {WI0: (wi0.shape, BF16), "decoder/zeros": (zeros.shape, BF16)}
    writer = OrbaxWriter(tmp_path / "0", leaves, chunk_shapes={WI0: (1, 1, 6, 4), "decoder/zeros": (2, 3)})
    writer.create()
    for e in range(5):
        for slot in range(3):  # the scanned layout's stack index is axis 1
            writer.write(WI0, (slice(e, e + 1), slice(slot, slot + 1), slice(None), slice(None)),
                         wi0[e:e + 1, slot:slot + 1].astype(F32))  # f32 blocks are cast to the leaf's bf16
    for r in range(0, 6, 2):
        writer.write("decoder/zeros", (slice(r, r + 2), slice(None)), zeros[r:r + 2])
    writer.finalize()
    chunk_dir = tmp_path / "0" / "items" / f"params.params.{WI0.replace('/', '.')}" / "c"
    assert len([p for p in chunk_dir.rglob("*") if p.is_file()]) == 15
    assert (chunk_dir / "1" / "2" / "0" / "0").is_file()  # an all-zero chunk is still on disk
    want = {WI0: wi0, "decoder/zeros": zeros}
    assert_same(ocp.PyTreeCheckpointer().restore(tmp_path / "0" / "items")["params"]["params"], want)
    assert_same(load_params(tmp_path / "0"), want)


def test_whole_chunks_we_write_equal_tensorstores_files(tmp_path):
    """Drift guard for the chunk files OrbaxWriter writes itself (uncompressed, whole chunks):
    byte for byte what TensorStore writes for the same blocks, and their hash equals the file's.
    Blocks: page-aligned ones over 4 MB (O_DIRECT, ragged length), small unaligned ones, an
    all-zero one, a scalar, and edge chunks cut by the shape (TensorStore writes those)."""
    from gptoss_convert.buffers import empty

    rng = np.random.default_rng(3)
    big = empty((2, 1024, 2049), BF16)                            # 4.2 MB per chunk: own mapping
    big[...] = rng.standard_normal(big.shape)
    small = rng.standard_normal((4, 5, 3)).astype(F32)
    small[2] = 0                                                  # an all-zero chunk
    edge = rng.standard_normal((5, 7)).astype(BF16)               # chunks of 2 rows: the last has 1
    scalar = np.float32(1.5)
    leaves = {"e/big": (big.shape, BF16), "e/small": (small.shape, F32), "e/edge": (edge.shape, BF16),
              "s": ((), F32)}
    chunks = {"e/big": (1, 1024, 2049), "e/small": (1, 5, 3), "e/edge": (2, 7)}

    def write(step_dir: Path, ours: bool) -> OrbaxWriter:
        writer = OrbaxWriter(step_dir, leaves, chunk_shapes=chunks, compression=None)
        if not ours:
            writer._whole_chunk = lambda *a: None                 # every block through TensorStore
        writer.create()
        for i in range(2):
            block = empty((1, 1024, 2049), BF16)
            block[...] = big[i:i + 1]
            writer.write_async("e/big", (slice(i, i + 1), slice(None), slice(None)), block, borrow=True).result()
        for i in range(4):
            writer.write("e/small", (slice(i, i + 1),) + ALL(2), small[i:i + 1])
        for r in range(0, 5, 2):
            writer.write("e/edge", (slice(r, min(r + 2, 5)), slice(None)), edge[r:r + 2])
        writer.write("s", (), scalar)
        writer.finalize()
        return writer

    ours, theirs = write(tmp_path / "ours", True), write(tmp_path / "theirs", False)
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())  # noqa: E731
    a, b = ours.item_dir, theirs.item_dir
    assert files(a) == files(b)
    for rel in files(a):
        if rel.name != "commit_success.txt":                     # names its own path
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for writer in (ours, theirs):                                 # from memory, or re-read after the commit
        chunk_files = {p for p in writer.item_dir.rglob("*")
                       if p.is_file() and "c" in p.relative_to(writer.item_dir).parts}
        assert set(writer.chunk_hashes()) == chunk_files and len(chunk_files) == 2 + 4 + 3 + 1
        for path, digest in writer.chunk_hashes().items():
            assert digest == xxhash.xxh3_128(path.read_bytes()).hexdigest(), path
    restored = flatten(ocp.PyTreeCheckpointer().restore(a)["params"]["params"])
    assert float(restored.pop("s")) == scalar
    assert_same(restored, {"e/big": big, "e/small": small, "e/edge": edge})


def test_remove_temporaries_leaves_the_chunks(tmp_path, values):
    """What a killed writer leaves beside the chunks (our temporaries, TensorStore's lock files)
    goes; chunk files and metadata stay."""
    writer = write_whole(tmp_path / "0", values)
    chunk = writer.chunk_file(WI0, (0, 0, 0, 0))
    stale = [chunk.with_name("0" + TEMP_SUFFIX), chunk.with_name("0.__lock")]
    for p in stale:
        p.write_bytes(b"half")
    before = {p for p in (tmp_path / "0").rglob("*") if p.is_file()}
    assert writer.remove_temporaries() == 2
    assert {p for p in (tmp_path / "0").rglob("*") if p.is_file()} == before - set(stale)


def test_resume_and_finalize(tmp_path, values):
    """(e) A crashed run is resumed by create() on the same step dir; only finalize() makes the
    step loadable, and it refuses while chunks are missing."""
    leaves = {p: (v.shape, v.dtype) for p, v in values.items()}
    chunks = {WI0: (1, 3, 6, 4)}
    first = OrbaxWriter(tmp_path / "0", leaves, chunk_shapes=chunks, custom_metadata={"scan_layers": True})
    first.create()
    for e in range(3):  # "crash" after 3 of 5 experts, other leaves untouched
        first.write(WI0, (slice(e, e + 1),) + ALL(3), values[WI0][e:e + 1])
    with pytest.raises(OutputError, match=r"5 leaves are incomplete.*wi_0: 3/5 chunks"):
        first.finalize()
    with pytest.raises(ocp1.errors.InvalidLayoutError):  # what MaxText's loader reports
        ocp1.load(tmp_path / "0", checkpointable_name="items")

    resumed = OrbaxWriter(tmp_path / "0", leaves, chunk_shapes=chunks, custom_metadata={"scan_layers": True})
    resumed.create()
    assert resumed.missing_chunks()[WI0] == (3, 5)  # earlier chunks were kept
    for e in range(2, 5):  # rewriting expert 2 is harmless
        resumed.write(WI0, (slice(e, e + 1),) + ALL(3), values[WI0][e:e + 1])
    for path, value in values.items():
        if path != WI0:
            resumed.write(path, ALL(value.ndim), value)
    resumed.finalize()
    assert_same(load_params(tmp_path / "0"), values)

    resumed.create()  # reopening a finished step marks it incomplete until finalize() again
    assert not (tmp_path / "0" / "_CHECKPOINT_METADATA").exists()
    resumed.finalize()
    assert_same(load_params(tmp_path / "0"), values)

    other = dict(leaves, **{WI0: ((5, 3, 6, 5), BF16)})
    with pytest.raises(OutputError, match="do not match this conversion.*wi_0"):
        OrbaxWriter(tmp_path / "0", other).create()


def test_write_rejects_bad_calls(tmp_path):
    writer = OrbaxWriter(tmp_path / "0", {"a/b": ((4, 3), F32)})
    with pytest.raises(RuntimeError, match="create"):
        writer.write("a/b", ALL(2), np.zeros((4, 3), F32))
    writer.create()
    with pytest.raises(KeyError, match="unknown leaf 'a/c'"):
        writer.write("a/c", ALL(2), np.zeros((4, 3), F32))
    with pytest.raises(ValueError, match=r"has shape \(4, 2\), expected \(4, 3\)"):
        writer.write("a/b", ALL(2), np.zeros((4, 2), F32))
    with pytest.raises(ValueError, match="2 slices"):
        writer.write("a/b", (slice(None),), np.zeros((4, 3), F32))
    with pytest.raises(ValueError, match="contiguous"):
        writer.write("a/b", (slice(0, 4, 2), slice(None)), np.zeros((2, 3), F32))
    with pytest.raises(ValueError, match="both a leaf and a parent"):
        OrbaxWriter(tmp_path / "1", {"a": ((1,), F32), "a/b": ((1,), F32)})
    with pytest.raises(ValueError, match="dotted"):
        OrbaxWriter(tmp_path / "1", {"a.b/c": ((1,), F32)})
    with pytest.raises(ValueError, match="one size >= 1 per axis"):
        OrbaxWriter(tmp_path / "1", {"a": ((4, 3), F32)}, chunk_shapes={"a": (4,)})


MEMORY_SCRIPT = """
import sys, time
from pathlib import Path

def hwm():
    # VmHWM: this process's own peak. Not ru_maxrss, which a child started by a big parent
    # (the pytest worker, with jax and torch loaded) inherits across fork+exec.
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
import ml_dtypes, numpy as np
from gptoss_convert.io.orbax_writer import OrbaxWriter
shape, block_shape = (32, 8, 1536, 2048), (1, 8, 1536, 2048)   # 1.61 GB leaf, 50.3 MB blocks, bf16
bf16 = np.dtype(ml_dtypes.bfloat16)
rng = np.random.default_rng(0)
block = rng.integers(0x3000, 0x4000, size=block_shape, dtype=np.uint16).view(bf16)  # finite, varied
writer = OrbaxWriter({step!r}, {{"w": (shape, bf16)}}, chunk_shapes={{"w": block_shape}})
writer.create()
base = hwm()
t0 = time.time()
for e in range(shape[0]):
    block[0, 0, 0, 0] = e
    writer.write("w", (slice(e, e + 1), slice(None), slice(None), slice(None)), block)
writer.finalize()
peak = hwm()
print(base, peak, block.nbytes, int(np.prod(shape)) * 2, time.time() - t0)
"""


@pytest.mark.slow
def test_memory_bounded_by_one_block(tmp_path):
    """(d) Writing a 1.6 GB leaf in 50 MB blocks: peak RSS stays a few blocks above the baseline."""
    out = run_script(MEMORY_SCRIPT.format(step=str(tmp_path / "0")), tmp_path).stdout.split()
    base, peak, block, leaf = map(int, out[:4])
    print(f"baseline {base / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, leaf {leaf / 2**20:.0f} MiB, "
          f"{float(out[4]):.1f} s")
    assert peak - base < 4 * block, (base, peak)
    assert peak < leaf / 4, (peak, leaf)
    got = open_leaf(tmp_path / "0", "w", prefix=("params", "params"))[31, 0, 0, :2].read().result()
    assert got[0] == np.asarray(31, BF16)


def test_chunk_cells_name_the_files_tensorstore_writes(tmp_path):
    """chunk_cells/cell_size/chunk_file (used to hash each chunk file as it completes) agree with
    the files TensorStore really writes, for chunks that do not divide the shape and for writes
    that cover chunks partly."""
    leaves = {"a/w": ((5, 7, 3), F32), "s": ((), F32)}
    writer = OrbaxWriter(tmp_path / "0", leaves, chunk_shapes={"a/w": (2, 7, 2)}, compression=None)
    writer.create()
    rows = [slice(0, 1), slice(1, 4), slice(4, 5)]               # straddle the 2-row chunks
    counts: dict = {}
    for r in rows:
        index = (r, slice(0, 7), slice(0, 3))
        writer.write("a/w", index, np.ones((r.stop - r.start, 7, 3), np.float32))
        for cell, n in writer.chunk_cells("a/w", index).items():
            counts[cell] = counts.get(cell, 0) + n
    writer.write("s", (), np.float32(2.0))
    assert sorted(counts) == [(i, 0, j) for i in range(3) for j in range(2)]
    assert counts == {cell: writer.cell_size("a/w", cell) for cell in counts}      # every chunk filled once
    assert sum(counts.values()) == 5 * 7 * 3
    assert writer.cell_size("a/w", (2, 0, 1)) == 1 * 7 * 1                           # edge chunk cut by the shape
    on_disk = {p for p in (tmp_path / "0" / "items" / "params.params.a.w" / "c").rglob("*") if p.is_file()}
    assert on_disk == {writer.chunk_file("a/w", cell) for cell in counts}
    assert writer.chunk_file("s", ()).is_file() and writer.chunk_cells("s", ()) == {(): 1}
