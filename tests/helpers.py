"""Helpers several test modules share (tests import these, never each other's privates)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import run_env
from stores_fixtures import _free_port as free_port  # noqa: F401 - one definition, re-exported
from gptoss_convert.converters.provenance import RECORD
from gptoss_convert.io.hf_checkpoint import SIDECAR_FILES
from gptoss_convert.io.safetensors import read_header, read_tensor

QUIET = dict(progress=False, log=lambda *_: None)
# Files whose bytes name where or when they were written (the commit marker's text names the
# step's path; the step metadata holds timestamps; the record holds argv and paths).
PLACE_OR_TIME = {"0/commit_success.txt", "0/items/commit_success.txt", "0/_CHECKPOINT_METADATA", RECORD}


def cli(*args, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m gptoss_convert ARGS` from this checkout, captured."""
    return subprocess.run([sys.executable, "-m", "gptoss_convert", *map(str, args)], capture_output=True, text=True,
                          env=run_env() | (env or {}), timeout=timeout)


def last_line(stderr: str) -> str:
    """The error line (TensorStore's AWS SDK logs its credential search to stderr before it)."""
    return stderr.strip().splitlines()[-1]


def local_files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def stored(d: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory as stored (raw dtype), by the safetensors header."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= {n: read_tensor(i) for n, i in read_header(f)[0].items()}
    return out


def tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def write_orbax(root: Path, params: dict[str, np.ndarray], sidecars: Path | None, scanned: bool) -> Path:
    """A params checkpoint written by OrbaxWriter (as a fine-tune's output), config beside it."""
    from gptoss_convert.io.orbax_writer import OrbaxWriter

    w = OrbaxWriter(root / "0", {p: (a.shape, a.dtype) for p, a in params.items()},
                    custom_metadata={"scan_layers": scanned})
    w.create()
    for p, a in params.items():
        w.write(p, tuple(slice(0, d) for d in a.shape), a)
    w.close()
    w.finalize()
    if sidecars is not None:
        for f in ("config.json", *SIDECAR_FILES):
            if (sidecars / f).is_file():
                shutil.copyfile(sidecars / f, root / f)
    return root


def maxtext_load(step_dir, cfg, scanned, dtype=None):
    """The call MaxText 0.2.5 makes (load_parameters_path=<root>/0/items -> <root>/0)."""
    import jax
    import orbax.checkpoint as ocp

    from gptoss_convert.backends.gpt_oss.params import abstract_params, flatten

    v1 = ocp.v1
    meta = v1.checkpointables_metadata(step_dir)
    assert meta.custom_metadata["scan_layers"] is scanned
    abstract = abstract_params(cfg, scanned, dtype or jax.numpy.float32)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    v1.metadata(step_dir)
    with v1.Context(pytree_options=v1.options.PyTreeOptions(
            loading=v1.options.PyTreeOptions.Loading(partial_load=True))):
        restored = v1.load(step_dir, {"params": {"params": abstract}}, checkpointable_name="items")
    return {k: np.asarray(v) for k, v in flatten(restored["params"]["params"]).items()}
