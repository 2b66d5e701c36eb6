"""A PEFT LoRA adapter as merge-lora reads it: its config checked, each A/B pair matched to the
base tensor it changes, and that tensor's change W' - W = scaling * (B @ A) computed in fp32,
laid out exactly as PEFT 0.21 lays it out (`peft/tuners/lora/layer.py`).

- A module target (`target_modules`, an nn.Linear such as `q_proj`): A [r, in], B [out, r],
  delta = (B @ A) * scaling, W's [out, in] (Linear.get_delta_weight, fan_in_fan_out off).
- A parameter target (`target_parameters`, PEFT's ParamWrapper) on gpt-oss's expert stack
  [E, in, out] (transformers marks GptOssExperts `is_transposed`, so PEFT does not swap in and
  out): A [r*E, in] whose rows e*r:(e+1)*r are expert e's, B [out, r*E] whose columns e::E are
  expert e's, delta[e] = (A_e.T @ B_e.T) * scaling (the einsum "o r e, e r i -> e i o").
  Several parameters of one module are nested wrappers, the first the module registers
  innermost: gpt-oss's `experts.base_layer.lora_A` is gate_up_proj's when both are targeted.

scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), times merge-lora's --scale.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import threading
from pathlib import Path

import numpy as np

from gptoss_convert.converters.provenance import source_hashes
from gptoss_convert.errors import InputError
from gptoss_convert.finite import all_finite
from gptoss_convert.io.files import read_json_object
from gptoss_convert.io.safetensors import TensorInfo, read_header, read_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
WRAPPED = ".base_layer"
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
# The nn.Parameters of one module PEFT may wrap, in the order the module registers them (GptOssExperts)
PARAM_ORDER = ("gate_up_proj", "down_proj")
FLOATS = {"F32", "BF16", "F16"}
# init_lora_weights values that leave the base weights as they are and need no variant to merge
# (others change the base when the adapter is created: PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA; or are a variant: MiCA)
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# config fields naming a LoRA variant or extra trained weights merge-lora does not implement
REFUSED = {"use_dora": "DoRA (use_dora)", "lora_bias": "a LoRA bias (lora_bias)", "modules_to_save": "modules_to_save",
           "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern", "fan_in_fan_out": "fan_in_fan_out",
           "use_qalora": "QA-LoRA (use_qalora)", "layer_replication": "layer_replication",
           "trainable_token_indices": "trainable_token_indices", "velora_config": "VeLoRA (velora_config)",
           "kasa_config": "KaSA (kasa_config)", "arrow_config": "Arrow (arrow_config)",
           "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)", "use_bdlora": "BD-LoRA (use_bdlora)"}


class Recent:
    """The last `keep` arrays made, by key (thread-safe): an expert stack's B, read once for all
    of its experts while the stacks being merged (at most two, at a boundary) are in flight."""

    def __init__(self, keep: int = 2):
        self.keep, self._items, self._lock = keep, collections.OrderedDict(), threading.Lock()

    def get(self, key: str, make) -> np.ndarray:
        with self._lock:
            if key not in self._items:
                self._items[key] = make()
                while len(self._items) > self.keep:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return self._items[key]


@dataclasses.dataclass
class LoraPair:
    """One base tensor's A and B, their rank and scaling; `experts` for a [E, in, out] stack."""

    tensor: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    scaling: float
    experts: int | None = None
    recent: Recent = dataclasses.field(default_factory=Recent, repr=False)

    @property
    def product_scale(self) -> float:
        """What `product` is multiplied by to give the delta: PEFT's scaling (applied after B @ A)."""
        return self.scaling

    def delta(self, rows: slice | None, shape: tuple[int, ...]) -> np.ndarray:
        """scaling * (B @ A) in fp32 for rows `rows` of the base tensor (experts: rows of experts)."""
        d = self.product(rows, shape)
        d *= np.float32(self.scaling)
        return d

    def product(self, rows: slice | None, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        """B @ A in fp32 (not yet scaled) for rows `rows` of the base tensor, into `out` if given
        (C-contiguous fp32 of the rows' shape): merge-lora scales and adds it in cache-sized tiles."""
        rows = slice(0, shape[0]) if rows is None else rows
        if out is None:
            out = np.empty((rows.stop - rows.start, *shape[1:]), np.float32)
        if self.experts is None:
            b = read_tensor(self.b, rows).astype(np.float32)
            np.matmul(b, read_tensor(self.a).astype(np.float32), out=out)
        else:       # B's columns e::E are expert e's: B is read whole once per stack, not once per expert
            r, b = self.rank, self.recent.get(self.tensor, lambda: read_tensor(self.b).astype(np.float32))
            a = read_tensor(self.a, slice(rows.start * r, rows.stop * r)).astype(np.float32)
            for e in range(rows.start, rows.stop):
                np.matmul(a[(e - rows.start) * r:(e - rows.start + 1) * r].T, b[:, e::self.experts].T,
                          out=out[e - rows.start])
        return out


@dataclasses.dataclass
class Adapter:
    """A PEFT LoRA adapter directory: its config, weights file and pairs, by base tensor name."""

    dir: Path
    config: dict
    pairs: dict[str, LoraPair]

    def files(self) -> list[str]:
        return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]

    def record(self, scale: float) -> dict:
        """What conversion.json keeps of the adapter."""
        keep = ("peft_version", "base_model_name_or_path", "r", "lora_alpha", "use_rslora", "target_modules",
                "target_parameters")
        return {"path": str(self.dir), **{k: self.config.get(k) for k in keep}, "scale": scale,
                "scaling": sorted({p.scaling for p in self.pairs.values()}), "tensors": sorted(self.pairs)}


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """A local adapter directory, or a hub repo id (its adapter_config.json and weights only)."""
    p = Path(adapter)
    if p.is_dir():
        return p
    if p.exists() or str(adapter).startswith((".", "/", "~")) or str(adapter).count("/") != 1:
        raise InputError(f"{adapter}: not an adapter directory and not a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(adapter), allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]))
    except Exception as e:      # offline, unknown repo: one line, what to do
        raise InputError(f"{adapter}: could not fetch the adapter from the hub ({type(e).__name__}); "
                         "pass a local adapter directory") from None


def check_config(path: Path) -> dict:
    """adapter_config.json, refused (one line naming the field) unless it is a plain LoRA."""
    conf = read_json_object(path, "a PEFT adapter directory must contain adapter_config.json")
    if conf.get("peft_type") != "LORA":
        raise InputError(f"{path}: peft_type {conf.get('peft_type')!r} is not supported; merge-lora merges LoRA only")
    for field, what in REFUSED.items():
        if conf.get(field):
            raise InputError(f"{path}: {what} is not supported by merge-lora; merge this adapter with PEFT's "
                             "merge_and_unload() instead")
    if conf.get("bias", "none") != "none":
        raise InputError(f"{path}: bias={conf['bias']!r} trains the base biases, which merge-lora does not merge; "
                         "use bias='none' or PEFT's merge_and_unload()")
    if conf.get("init_lora_weights", True) not in PLAIN_INITS:
        raise InputError(f"{path}: init_lora_weights={conf['init_lora_weights']!r} changed the base weights when the "
                         "adapter was made (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA) or is a variant (MiCA); save it "
                         "converted (path_initial_model_for_weight_conversion) or merge it with PEFT")
    for field in ("r", "lora_alpha"):
        if not isinstance(conf.get(field), (int, float)) or isinstance(conf.get(field), bool) or conf[field] <= 0:
            raise InputError(f"{path}: {field} {conf.get(field)!r} is not a positive number")
    return conf


def open_adapter(adapter: str | os.PathLike, base: dict[str, tuple[int, ...]], scale: float = 1.0) -> Adapter:
    """The adapter at `adapter`, every pair matched to a tensor of `base` ({name: shape}) and checked."""
    d = resolve_adapter(adapter)
    conf = check_config(d / ADAPTER_CONFIG)
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickle = (d / "adapter_model.bin").is_file()
        other = " (adapter_model.bin is a pickle: save with safe_serialization=True)" if pickle else ""
        raise InputError(f"{d}: no {ADAPTER_WEIGHTS}{other}")
    stored, _ = read_header(weights)
    pairs: dict[str, LoraPair] = {}
    recent = Recent()
    for module, (a, b) in _modules(stored, weights).items():
        name = _base_tensor(module, conf, base, weights)
        if name in pairs:
            raise InputError(f"{weights}: two LoRA pairs change {name}; merge this adapter with PEFT instead")
        pairs[name] = dataclasses.replace(_pair(name, a, b, base[name], conf, scale, weights), recent=recent)
    if not pairs:
        raise InputError(f"{weights}: holds no LoRA weights")
    return Adapter(d, conf, pairs)


def _modules(stored: dict[str, TensorInfo], weights: Path) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """{module path: (lora_A, lora_B)}; anything else in the file is refused, naming it."""
    found: dict[str, dict[str, TensorInfo]] = {}
    for key, info in stored.items():
        short = key.removeprefix(KEY_PREFIX)
        side = "A" if short.endswith(A_SUFFIX) else "B" if short.endswith(B_SUFFIX) else None
        if side is None:
            raise InputError(f"{weights}: tensor {key!r} is not a LoRA A/B weight (embedding LoRA, a LoRA bias or "
                             "modules_to_save?); merge-lora merges Linear and parameter LoRA only")
        if info.dtype not in FLOATS:
            raise InputError(f"{weights}: tensor {key!r} is {info.dtype}; LoRA weights must be F32, BF16 or F16")
        found.setdefault(short[:-len(A_SUFFIX)], {})[side] = info
    half = [m for m, ab in found.items() if len(ab) != 2]
    if half:
        raise InputError(f"{weights}: {half[0]} has only lora_{next(iter(found[half[0]]))}; the file is incomplete")
    return {m: (ab["A"], ab["B"]) for m, ab in found.items()}


def _targets(name: str, conf: dict) -> bool:
    """Whether PEFT's target_parameters matching selects the parameter `name`."""
    return any(name == t or name.endswith("." + t) for t in conf.get("target_parameters") or [])


def _base_tensor(module: str, conf: dict, base: dict, weights: Path) -> str:
    """The base tensor a module path of the adapter changes: `module.weight` for a module target;
    for nested ParamWrappers (`.base_layer` k times) the k-th targeted parameter from the outside."""
    depth, inner = 0, module
    while inner.endswith(WRAPPED):
        inner, depth = inner[:-len(WRAPPED)], depth + 1
    params = [f"{inner}.{p}" for p in PARAM_ORDER if f"{inner}.{p}" in base and _targets(f"{inner}.{p}", conf)]
    if params and depth < len(params):
        return params[len(params) - 1 - depth]
    if depth == 0 and f"{module}.weight" in base:
        return f"{module}.weight"
    raise InputError(f"{weights}: LoRA weights {module}.lora_A/B match no tensor of the base checkpoint; is the "
                     "adapter for this model (and its target_parameters for tensors the checkpoint stores)?")


def _pair(name: str, a: TensorInfo, b: TensorInfo, shape: tuple[int, ...], conf: dict, scale: float,
          weights: Path) -> LoraPair:
    """The checked pair for base tensor `name` of `shape` ([out, in], or [E, in, out])."""
    r = conf["r"]
    if len(shape) == 2:
        want_a, want_b, experts = (r, shape[1]), (shape[0], r), None
    elif len(shape) == 3:
        want_a, want_b, experts = (r * shape[0], shape[1]), (shape[2], r * shape[0]), shape[0]
        if (a.shape, b.shape) == ((r * shape[0], shape[2]), (shape[1], r * shape[0])) and shape[1] != shape[2]:
            raise InputError(f"{weights}: LoRA of {name} is laid out [experts, out, in] (PEFT without transformers' "
                             "is_transposed for gpt-oss experts); retrain with transformers >= 5, or merge with PEFT")
    else:
        raise InputError(f"{weights}: {name} is {len(shape)}-dimensional; LoRA merges 2D and 3D weights only")
    if (a.shape, b.shape) != (want_a, want_b):
        raise InputError(f"{weights}: LoRA of {name} {list(shape)} has A {list(a.shape)} and B {list(b.shape)}, "
                         f"expected A {list(want_a)} and B {list(want_b)} for r={r}; is it for this model?")
    scaling = conf["lora_alpha"] / (math.sqrt(r) if conf.get("use_rslora") else r) * scale
    return LoraPair(name, a, b, r, scaling, experts)


class LoraSource:
    """A base checkpoint and an adapter as one job source: files `base/<f>` and `adapter/<f>`,
    so resume compares the bytes of both (docs/design.md §4)."""

    def __init__(self, base, adapter: Adapter):
        self.base, self.adapter = base, adapter
        self.root = base.root
        self.config_raw = base.config_raw
        self._dirs = {"base": Path(base.root), "adapter": adapter.dir}

    def files(self) -> list[str]:
        return [f"base/{f}" for f in self.base.files()] + [f"adapter/{f}" for f in self.adapter.files()]

    def _split(self, files: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"base": [], "adapter": []}
        for f in files:
            side, _, rel = f.partition("/")
            out[side].append(rel)
        return out

    def sizes(self) -> dict[str, int]:
        return {f: (self._dirs[s] / rel).stat().st_size for s, rels in self._split(self.files()).items()
                for rel in rels for f in [f"{s}/{rel}"]}

    def hash(self, files: list[str]) -> dict[str, dict]:
        """Content hashes (and sizes: the record's files live in two directories) of `files`."""
        out = {}
        for side, rels in self._split(files).items():
            for rel, h in source_hashes(self._dirs[side], rels, workers=1).items():
                out[f"{side}/{rel}"] = {"size": (self._dirs[side] / rel).stat().st_size, **h}
        return out


def adapter_summary(adapter: Adapter) -> str:
    """One line: what the adapter changes."""
    c = adapter.config
    if isinstance(adapter, MaxTextAdapter):
        return (f"adapter {adapter.dir} (MaxText LoRA, {adapter.source.layout.name}): r={adapter.rank} "
                f"lora_alpha={adapter.alpha} (scaling {adapter.scaling:g}), {len(adapter.weights)} MaxText weights -> "
                f"{len(adapter.pairs)} HF tensors")
    experts = sum(p.experts is not None for p in adapter.pairs.values())
    rs = " (rsLoRA)" if c.get("use_rslora") else ""
    return (f"adapter {adapter.dir}: r={c['r']} lora_alpha={c['lora_alpha']}{rs}, "
            f"{len(adapter.pairs)} tensors ({experts} expert stacks); targets "
            f"{json.dumps(c.get('target_modules'))} / {json.dumps(c.get('target_parameters'))}")


# --- a MaxText / Tunix LoRA checkpoint (qwix's adapters) -----------------------------------------

LORA_A, LORA_B = "_lora_a", "_lora_b"      # qwix names a weight `w`'s adapters `w_lora_a`, `w_lora_b`
EXPERT_MODULES = ("GptOssMlp", "MoeBlock")  # where gpt-oss's (and MoE models') expert weights live


@dataclasses.dataclass
class MaxTextLora:
    """One MaxText weight's qwix adapter: leaf `base` ([C..., R...], the layer axis at SCAN_AXIS
    when scanned) changes by alpha/rank * reshape(A @ B), A [prod C, (L,) r], B [r, (L,) prod R]
    (qwix `_compute_lora_delta`: A reshaped to the contracting dims, B to the remaining ones)."""

    base: str
    a: str
    b: str
    split: int                  # the weight's first `split` (per-layer) axes are the contracting ones
    scanned: bool


class MaxTextAdapter:
    """A MaxText LoRA checkpoint (Tunix's model_params holding only `*_lora_a/_lora_b`, no rank
    or alpha): each adapter matched to a MaxText weight of the base's tree, and `pairs` giving
    merge-lora each changed HF tensor's delta (the MaxText delta through the to-hf mapping)."""

    def __init__(self, source, backend, cfg, alpha: float, rank: int, scale: float, hf_names):
        from gptoss_convert.mapping.layout import SCAN_AXIS

        self.source, self.backend, self.cfg = source, backend, cfg
        self.dir = Path(str(source.step_dir))
        self.alpha, self.rank, self.scale = alpha, rank, scale
        self.scaling = alpha / rank * scale
        self.axis = SCAN_AXIS
        self.config = {"r": rank, "lora_alpha": alpha, "format": "maxtext", "layout": source.layout.name}
        self.weights = self._match(backend.flat_shapes(cfg, source.scanned))
        self._deltas = Recent(keep=4)          # a few layers in flight across read workers
        self.pairs = self._hf_pairs(hf_names)

    def files(self) -> list[str]:
        return self.source.files()

    def _match(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, MaxTextLora]:
        """{base leaf: its adapter}; anything but A/B pairs of a weight of the base refused."""
        found: dict[str, dict[str, str]] = {}
        for path in self.source.leaves:
            side = "a" if path.endswith(LORA_A) else "b" if path.endswith(LORA_B) else None
            if side is None:
                raise InputError(f"{self.dir}: leaf {path} is not a LoRA adapter (*{LORA_A}, *{LORA_B}); a full "
                                 "fine-tune is exported with to-hf, not merged")
            found.setdefault(path[:-len(LORA_A)], {})[side] = path
        out = {}
        for base, ab in sorted(found.items()):
            if len(ab) != 2:
                raise InputError(f"{self.dir}: {base} has only {next(iter(ab.values()))}; the checkpoint is incomplete")
            if base not in shapes:
                raise InputError(f"{self.dir}: adapters {base}{LORA_A}/{LORA_B} change no weight of the base "
                                 f"({'scanned' if self.source.scanned else 'unscanned'} {self.backend.model_type}); "
                                 "is it for this model?")
            out[base] = self._check(base, shapes[base], ab["a"], ab["b"])
        if not out:
            raise InputError(f"{self.dir}: holds no LoRA adapters")
        return out

    def _check(self, base: str, shape: tuple[int, ...], a: str, b: str) -> MaxTextLora:
        """The adapter's shapes against the weight's and --lora-rank; the contracting split found."""
        sa, sb = self.source.leaves[a][0], self.source.leaves[b][0]
        scanned = self.source.scanned
        local = shape[:self.axis] + shape[self.axis + 1:] if scanned else shape
        layers = (shape[self.axis],) if scanned else ()
        if sa[-1] != self.rank or sb[0] != self.rank:
            raise InputError(f"{self.dir}: {base}'s adapters are rank {sa[-1]} (A {list(sa)}, B {list(sb)}), not "
                             f"--lora-rank {self.rank}; pass the rank the run trained with")
        splits = [k for k in range(1, len(local)) if sa == (math.prod(local[:k]), *layers, self.rank)
                  and sb == (self.rank, *layers, math.prod(local[k:]))]
        if len(splits) != 1:
            raise InputError(f"{self.dir}: {base} {list(shape)} cannot take adapters A {list(sa)}, B {list(sb)} "
                             "(contracting dims leading, remaining trailing, as qwix lays them out); is it for this "
                             "model?")
        return MaxTextLora(base, a, b, splits[0], scanned)

    def layer_delta(self, base: str, slot: int | None) -> np.ndarray:
        """alpha/rank*scale * reshape(A @ B) of weight `base`, one layer (stack slot `slot` when
        scanned), in the weight's per-layer shape, fp32; the last few made are kept."""
        lora = self.weights[base]
        shape = self.backend.flat_shapes(self.cfg, lora.scanned)[base]
        local = shape[:self.axis] + shape[self.axis + 1:] if lora.scanned else shape

        def make():
            at = (slice(None), slot) if lora.scanned else ()
            a = np.asarray(self.source.read(lora.a, at), np.float32)           # [prod C, r]
            b = np.asarray(self.source.read(lora.b, at), np.float32)           # [r, prod R]
            return (a @ b * np.float32(self.scaling)).reshape(local)           # [C..., R...]
        return self._deltas.get(f"{base}#{slot}", make)

    def delta_at(self, base: str, index: tuple) -> np.ndarray:
        """The delta of weight `base`[index] (an index as to-hf reads leaves: one stack slot)."""
        if not self.weights[base].scanned:
            return self.layer_delta(base, None)[index]
        index = tuple(index) + (slice(None),) * (self.axis + 1 - len(index))
        slot = index[self.axis]
        if isinstance(slot, (int, np.integer)):
            return self.layer_delta(base, int(slot))[index[:self.axis] + index[self.axis + 1:]]
        layers = self.backend.flat_shapes(self.cfg, True)[base][self.axis]
        whole = np.stack([self.layer_delta(base, i) for i in range(layers)], axis=self.axis)
        return whole[index]

    def _hf_pairs(self, hf_names) -> dict[str, "MaxTextPair"]:
        """{HF tensor: its delta} for every HF tensor made of a weight the adapter changes."""
        import types

        from gptoss_convert.converters.to_hf import export_plan
        shapes = self.backend.flat_shapes(self.cfg, self.source.scanned)
        fake = types.SimpleNamespace(leaves={p: (s, np.dtype(np.float32)) for p, s in shapes.items()},
                                     scanned=self.source.scanned)
        pairs = {}
        for t in export_plan(self.backend, self.cfg, fake, mxfp4=False, itemsize=4):
            if any(p in self.weights for p, _ in t.sources):
                if t.name not in hf_names:
                    raise InputError(f"{self.dir}: the adapter changes {t.name}, which the base checkpoint lacks")
                if len(t.sources) != 1 or t.expert is not None:
                    raise InputError(f"{self.dir}: adapters on {t.sources[0][0]} (an expert or fused weight) are not "
                                     "merged by merge-lora yet; merge them in MaxText")
                pairs[t.name] = MaxTextPair(self, t)
        return pairs

    def record(self, scale: float) -> dict:
        return {"path": str(self.dir), "format": "maxtext", "layout": self.source.layout.record(), "r": self.rank,
                "lora_alpha": self.alpha, "scale": scale, "scaling": [self.scaling],
                "maxtext_weights": sorted(self.weights), "tensors": sorted(self.pairs)}

    def experts_note(self) -> str | None:
        """Why no expert changes, where the checkpoint has no expert adapters (qwix hooks
        dot_general/einsum on weights; the MoE's experts are not among the weights it wrapped)."""
        if any(m in w for w in self.weights for m in EXPERT_MODULES):
            return None
        return ("note: this MaxText LoRA holds adapters for attention only, none for the experts: MaxText's "
                "gpt-oss lora_module_path names GptOssMlp/wi_0|wi_1|wo, but qwix creates no adapter on the MoE's "
                "expert weights; the merged experts are the base's")


@dataclasses.dataclass
class MaxTextPair:
    """One HF tensor's change from a MaxText adapter: the weight's delta, through to-hf's mapping."""

    adapter: MaxTextAdapter
    tensor: object                   # to_hf.ExportTensor
    experts: int | None = None

    @property
    def scaling(self) -> float:
        return self.adapter.scaling

    @property
    def rank(self) -> int:
        return self.adapter.rank

    # MaxText's rule scales A @ B before the reshape (qwix's forward): `product` is the delta itself.
    product_scale = 1.0

    def product(self, rows: slice | None, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        """The delta for rows `rows` (already scaled), into `out` if given (merge-lora's pooled buffer)."""
        d = self.delta(rows, shape)
        if out is None:
            return d
        np.copyto(out, d)
        return out

    def delta(self, rows: slice | None, shape: tuple[int, ...]) -> np.ndarray:
        from gptoss_convert.mapping.transforms import apply
        (path, slot), = self.tensor.sources
        d = self.adapter.layer_delta(path, slot)
        d = np.ascontiguousarray(apply(self.tensor.transforms, d), dtype=np.float32)
        if d.shape != tuple(shape):
            raise InputError(f"{self.adapter.dir}: the delta of {self.tensor.name} is {list(d.shape)}, the base "
                             f"tensor {list(shape)}")
        return d if rows is None else d[rows]


def open_maxtext_adapter(adapter, backend, cfg, hf_names, *, alpha: float | None, rank: int | None, scale: float,
                         step: int | None = None, item: str | None = None) -> MaxTextAdapter:
    """A MaxText LoRA run root or step (any layout io/orbax_source reads), with the rank and
    alpha MaxText does not record (refused without them, naming the flags)."""
    from gptoss_convert.io.orbax_source import open_orbax
    if alpha is None or rank is None:
        missing = " and ".join(f for f, v in (("--lora-alpha", alpha), ("--lora-rank", rank)) if v is None)
        raise InputError(f"{adapter}: a MaxText LoRA checkpoint records no rank or alpha; pass {missing} (the "
                         "lora.lora_alpha and lora.lora_rank the run trained with)")
    if rank <= 0 or not alpha > 0 or not math.isfinite(alpha):
        raise InputError(f"--lora-rank {rank} / --lora-alpha {alpha}: must be positive")
    source = open_orbax(adapter, step=step, item=item)
    return MaxTextAdapter(source, backend, cfg, float(alpha), int(rank), scale, hf_names)


class MergedLeaves:
    """An Orbax source whose leaves read as W + the MaxText adapter's delta (fp32) where it has
    one; everything else is the base's (OrbaxSource's interface, for to-hf's export)."""

    def __init__(self, base, lora):
        self.base, self.lora = base, lora

    def __getattr__(self, name):
        return getattr(self.base, name)

    def read(self, path: str, index: tuple, on_whole_file=None) -> np.ndarray:
        x = self.base.read(path, index, on_whole_file)
        if path in self.lora.weights:
            x = x.astype(np.float32) + self.lora.delta_at(path, index)
        return x


def hf_tensor_shapes(source) -> dict[str, tuple[int, ...]]:
    """{HF tensor: its shape} as to-hf makes them of an Orbax source (an OrbaxSrc), by its mapping table."""
    from gptoss_convert.converters.to_hf import export_plan
    return {t.name: t.shape for t in export_plan(source.backend, source.cfg, source.orbax, mxfp4=False, itemsize=4)}


def merged_export_target(source, lora: Adapter, *, mxfp4: bool, dt, max_shard: int, block_bytes: int, rule: str,
                         allow_nonfinite: bool, workers: int | None, like, scale: float):
    """to-hf's export target of the Orbax source `source` (an OrbaxSrc), recorded as merge-lora
    with the adapter. A MaxText adapter merges in MaxText's layout as each leaf is read (its
    `orbax` is replaced by the merged view); a PEFT one, in HF names, as each HF block is made:
    W + scaling * (B @ A) in fp32 (to_hf.read_block's `delta`)."""
    from gptoss_convert.converters.to_hf import READ_WORKERS, ExportOptions, export_target
    opts = ExportOptions(rule, dt.np, allow_nonfinite, workers or max(READ_WORKERS, os.cpu_count() or 1))
    if isinstance(lora, MaxTextAdapter):
        source.orbax = MergedLeaves(source.orbax, lora)
    else:
        opts.delta = lambda t, rows: lora.pairs[t.name].delta(rows, t.shape) if t.name in lora.pairs else None
    target = export_target(source, mxfp4=mxfp4, dt=dt, max_shard=max_shard, block_bytes=block_bytes, opts=opts,
                           like=like)
    if not isinstance(lora, MaxTextAdapter):    # each worker's block in fp32: W, its delta and the sum
        target.memory = dataclasses.replace(target.memory, per=4, largest=max(
            (t.block_bytes // t.itemsize * 4 for t in target.tensors), default=0))
    target.command = "merge-lora"
    target.extra["lora"] = lora.record(scale)
    return target


class MergedTensors:
    """An HF checkpoint whose tensors the adapter changes read as W + its change, in fp32 (W
    decoded or widened to fp32, then scaling * (B @ A) added in fp32, as PEFT's merge and
    merge-lora's HF output compute it); every other tensor reads as the checkpoint's own
    (HFCheckpoint's read interface, for to-orbax's plan)."""

    def __init__(self, ck, lora: Adapter):
        self.ck, self.lora = ck, lora

    def __getattr__(self, name):
        return getattr(self.ck, name)

    def read(self, name: str, rows: slice | None = None, dtype=None, alloc=None) -> np.ndarray:
        pair = self.lora.pairs.get(name)
        if pair is None:
            return self.ck.read(name, rows, **({} if dtype is None else {"dtype": dtype}), alloc=alloc)
        w = self.ck.read(name, rows, dtype=np.float32)
        d = pair.product(rows, self.ck.tensors[name].shape)     # [rows, ...] fp32, B @ A (MaxText's: scaled)
        d *= np.float32(pair.product_scale)
        d += w                                                  # = W + scaling * (B @ A), PEFT's order
        if not self.ck.allow_nonfinite and not all_finite(d):
            r = "" if rows is None else f" rows {rows.start}:{rows.stop}"
            raise InputError(f"{name}{r}: the merged weights hold NaN or inf (is the adapter {self.lora.dir} "
                             "broken?); pass --allow-nonfinite to write them anyway")
        return d

    def read_parts(self, name: str, parts: int, rows: slice | None = None, dtype=None, alloc=None) -> list[np.ndarray]:
        """read(name, rows)[..., p::parts] for each p, C-contiguous (the gate/up split)."""
        if name not in self.lora.pairs:
            return self.ck.read_parts(name, parts, rows, **({} if dtype is None else {"dtype": dtype}), alloc=alloc)
        whole = self.read(name, rows)
        return [np.ascontiguousarray(whole[..., p::parts]) for p in range(parts)]


class OrbaxAsHF:
    """An Orbax source (an OrbaxSrc) read as the HF checkpoint to-hf makes of it, in fp32
    (HFCheckpoint's read interface: to-hf's mapping run backwards per block), so that a PEFT
    adapter (HF names) can merge into it on its way to to-orbax's target."""

    def __init__(self, source, allow_nonfinite: bool):
        import types

        from gptoss_convert.converters.to_hf import export_plan
        self.source, self.allow_nonfinite, self.workers = source, allow_nonfinite, None
        self.plan = {t.name: t for t in export_plan(source.backend, source.cfg, source.orbax, mxfp4=False, itemsize=4)}
        self.tensors = {n: types.SimpleNamespace(shape=t.shape, dtype="F32", is_mxfp4=False)
                        for n, t in self.plan.items()}
        self.config_raw, self.dir, self.files = source.config_raw, source.orbax.step_dir, source.files()
        self._whole = Recent(keep=2)        # tensors whose HF rows are no leaf axis (q/k/v): read whole once

    def sidecar_files(self) -> list:
        return self.source.sidecars()

    def read(self, name: str, rows: slice | None = None, dtype=None, alloc=None) -> np.ndarray:
        from gptoss_convert.converters.to_hf import read_block
        t = self.plan[name]
        if rows is not None and t.row_axis is None:
            return self._whole.get(name, lambda: self.read(name))[rows]
        return read_block(self.source.orbax, t, rows, np.dtype(np.float32), self.allow_nonfinite)

    def read_parts(self, name: str, parts: int, rows: slice | None = None, dtype=None, alloc=None) -> list[np.ndarray]:
        whole = self.read(name, rows)
        return [np.ascontiguousarray(whole[..., p::parts]) for p in range(parts)]


def merged_orbax_target(ck, lora: Adapter, *, scanned: bool, dt, block_bytes: int, compression: str | None,
                        strict_config: bool, scale: float):
    """to-orbax's target (OrbaxTarget, MaxText layout) of the HF checkpoint `ck` with `lora`
    merged into the tensors it changes as they are read, recorded as merge-lora."""
    from gptoss_convert.converters.to_orbax import hf_target
    target = hf_target(MergedTensors(ck, lora), scanned=scanned, dt=dt, block_bytes=block_bytes,
                       compression=compression, strict_config=strict_config)
    return _as_merge(target, lora, scale, fp32_blocks=4 // dt.itemsize)


def merged_relayout_target(source, lora: "MaxTextAdapter", *, scanned: bool, dt, block_bytes: int,
                           compression: str | None, allow_nonfinite: bool, scale: float):
    """to-orbax's relayout target of the Orbax source `source` (an OrbaxSrc) with the MaxText
    adapter merged into each leaf as it is read (MergedLeaves), recorded as merge-lora."""
    from gptoss_convert.converters.relayout import relayout_target
    source.orbax = MergedLeaves(source.orbax, lora)
    target = relayout_target(source, scanned=scanned, dtype=dt, allow_nonfinite=allow_nonfinite,
                             block_bytes=block_bytes, compression=compression)
    return _as_merge(target, lora, scale, fp32_blocks=4 // dt.itemsize)


def _as_merge(target, lora: Adapter, scale: float, fp32_blocks: int):
    """An OrbaxTarget recorded (and fingerprinted: resume) as merge-lora of `lora` at `scale`;
    its blocks are read merged in fp32 (`fp32_blocks` times their output size), W and the change
    beside each while it is merged."""
    target.command = "merge-lora"
    line = target.summary_of
    target.summary_of = lambda result, seconds: "merge-lora: " + line(result, seconds).removeprefix("to-orbax: ")
    target.recorded.update({"scale": scale, "adapter": str(lora.dir)})
    target.identity["scaling"] = lora.record(scale)["scaling"]
    target.extra["lora"] = lora.record(scale)
    m = target.memory
    target.memory = dataclasses.replace(m, largest=m.largest * fp32_blocks, transient=m.transient + 2)
    return target
