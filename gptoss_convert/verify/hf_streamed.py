"""The golden in bounded memory: transformers' own model code, one decoder layer at a time.

`golden` on a model bigger than memory cannot load it whole (gpt-oss-20b is ~84 GB in fp32). This
runs the same modules `from_pretrained` would build — the CausalLM is instantiated on the meta
device with eager attention and experts, then each piece gets real weights only while it runs:
the embedding, each decoder layer (`GptOssDecoderLayer`, `Qwen3MoeDecoderLayer`, ...), the final
norm and the LM head. Rotary embeddings and the causal / sliding-window masks are built the way
the family's `Model.forward` builds them (`_masks`). All prompts advance through a layer together
(each as its own unpadded sequence, as `golden` runs them), then the layer's weights are freed.

Weights come from the HF safetensors files through the `safetensors` package; MXFP4 experts are
dequantized by transformers' `convert_moe_packed_tensors` (one expert at a time, into the fused
parameter) and per-expert checkpoints (Qwen3-MoE) are fused by transformers' own checkpoint
conversion ops (`conversion_mapping`). Only the file reading and the layer loop are ours: nothing
here uses this project's converters, reader or JAX forward. Memory: one layer's weights in the
chosen dtype (fp32: ~3.3 GB for a gpt-oss-20b/120b layer) or the embedding / LM head, plus the
prompts' activations. The logits equal the whole-model golden's bit for bit (tests/test_golden_streamed.py).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from gptoss_convert.errors import InputError
from gptoss_convert.progress import progress, step


class SafetensorsFiles:
    """The tensors of an HF directory (one file or an index), read by name with `safetensors`."""

    def __init__(self, d: Path):
        self.dir = Path(d)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise InputError(f"{self.dir}: no *.safetensors files; golden needs the HF checkpoint")
            self.where = {}
            for f in files:
                with safe_open(f, framework="pt") as h:
                    self.where |= dict.fromkeys(h.keys(), f.name)
        self._handles: dict = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _file(self, name: str):
        from safetensors import safe_open
        fname = self.where[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.dir / fname, framework="pt")
        return self._handles[fname]

    def get(self, name: str, index=None):
        """Tensor `name` (or its slice `index` along the first axis) as a torch tensor."""
        if name not in self.where:
            raise InputError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        f = self._file(name)
        return f.get_tensor(name) if index is None else f.get_slice(name)[index]

    def release(self) -> None:
        """Close the open files: their mapped pages stop counting in this process's memory."""
        self._handles = {}

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._file(name).get_slice(name).get_dtype()


@contextlib.contextmanager
def _default_dtype(dtype):
    """torch's default dtype while modules are built, as from_pretrained(dtype=...) does."""
    import torch
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def skeleton(d: Path, dtype):
    """The family's CausalLM on the meta device (no memory), eager attention and experts, and a
    real rotary-embedding module built as the model builds it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(d)
    if hasattr(config, "quantization_config"):
        del config.quantization_config            # weights are dequantized here, not by a quantizer
    with _default_dtype(dtype), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation="eager")
    with _default_dtype(dtype):
        rotary = type(model.model.rotary_emb)(config=model.config)
    return model.eval(), rotary


class LayerLoader:
    """Real weights for one module of the meta model at a time, from the safetensors files."""

    def __init__(self, files: SafetensorsFiles, model, dtype):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        self.files, self.model, self.dtype = files, model, dtype
        self.converters = get_checkpoint_conversion_mapping(model.config.model_type) or []
        self.fp32 = list(model._get_dtype_plan(dtype))          # _keep_in_fp32_modules_strict, as loaded

    def load(self, module, prefix: str) -> None:
        """Give `module` (named `prefix` in the checkpoint) its weights: assigned, not copied."""
        sd = {name: self._param(prefix, name) for name in module.state_dict()}
        self.files.release()
        module.load_state_dict(sd, assign=True, strict=True)

    @staticmethod
    def free(module) -> None:
        """Back to the meta device: the weights' memory is released."""
        module.to("meta")

    def _cast(self, full: str, t):
        import torch
        return t.to(torch.float32 if any(k in full for k in self.fp32) else self.dtype)

    def _param(self, prefix: str, name: str):
        full = prefix + name
        if full in self.files:
            return self._cast(full, self.files.get(full))
        if full + "_blocks" in self.files:
            return self._mxfp4(full)
        for conv in self.converters:
            if any(name == t or name.endswith("." + t) for t in conv.target_patterns):
                return self._cast(full, self._convert(prefix, conv))
        raise InputError(f"{self.files.dir}: no tensor for {full} (nor MXFP4 blocks, nor per-expert tensors)")

    def _mxfp4(self, full: str):
        """transformers' dequantization of the packed experts, one expert at a time."""
        import torch
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
        E = self.files.shape(full + "_blocks")[0]
        out = None
        for e in range(E):
            w = convert_moe_packed_tensors(self.files.get(full + "_blocks", slice(e, e + 1)),
                                           self.files.get(full + "_scales", slice(e, e + 1)), dtype=self.dtype)
            if out is None:
                out = torch.empty((E, *w.shape[1:]), dtype=self.dtype)
            out[e] = w[0]
        return out

    def _convert(self, prefix: str, conv):
        """A fused parameter from per-expert tensors through transformers' conversion ops."""
        inputs = {}
        for pattern in conv.source_patterns:
            rx = re.compile(re.escape(prefix) + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
            found = sorted((int(m.group(1)), n) for n in self.files.where if (m := rx.match(n)))
            inputs[pattern] = [self.files.get(n) for _, n in found]
        for op in conv.operations:
            inputs = op.convert(inputs, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                                config=self.model.config)
        (tensor,) = inputs.values()
        return tensor


def _masks(model, embeds, position_ids) -> dict:
    """The attention mask(s) of one unpadded sequence, as the family's Model.forward builds them
    (no cache, no padding mask): {layer type: mask}, '*' for a family with one mask."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    cfg = model.config
    kw = {"config": cfg, "inputs_embeds": embeds, "attention_mask": None, "cache": None}
    if cfg.model_type == "gpt_oss":                  # GptOssModel.forward: one mask per layer type
        return {"full_attention": create_causal_mask(**kw),
                "sliding_attention": create_sliding_window_causal_mask(**kw)}
    if cfg.model_type == "qwen3_moe":                # Qwen3MoeModel.forward: one mask, position_ids passed
        fn = create_causal_mask if cfg.sliding_window is None else create_sliding_window_causal_mask
        return {"*": fn(**kw, position_ids=position_ids)}
    raise InputError(f"streamed golden: model type {cfg.model_type!r} has no mask recipe here; use --in-memory")


class Sequence:
    """One prompt's state through the layers: hidden states, positions, rotary embeddings, masks."""

    def __init__(self, model, rotary, embeds):
        import torch
        self.h = embeds
        self.position_ids = torch.arange(embeds.shape[1]).unsqueeze(0)
        self.position_embeddings = rotary(embeds, self.position_ids)
        self.masks = _masks(model, embeds, self.position_ids)

    def mask(self, layer_type: str | None):
        return self.masks.get(layer_type, self.masks.get("*"))


class Coverage:
    """Which experts transformers' router sent real tokens to, per layer (a pre-hook on the experts)."""

    def __init__(self, n_layers: int):
        self.hit: list[set[int]] = [set() for _ in range(n_layers)]

    def hook(self, layer: int):
        def pre(module, args, kwargs):
            idx = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "ind" in k)
            self.hit[layer].update(int(e) for e in idx.reshape(-1).tolist())
        return pre


def streamed_logits(d: str | Path, token_lists: list[list[int]], dtype: str = "float32", *,
                    show_progress: bool = True) -> tuple[list, list[list[int]]]:
    """fp32 numpy logits [T, V] per token list from transformers run layer by layer on the HF
    directory `d`, and the experts routed per layer (sorted lists)."""
    import torch
    torch_dtype = getattr(torch, dtype)
    files = SafetensorsFiles(Path(d))
    model, rotary = skeleton(Path(d), torch_dtype)
    loader = LayerLoader(files, model, torch_dtype)
    inner = model.model
    with torch.no_grad():
        seqs = _embed(loader, model, rotary, token_lists, show_progress)
        cov = Coverage(len(inner.layers))
        with progress(len(inner.layers), "golden: transformers layers", show_progress, unit="it") as bar:
            for i, layer in enumerate(inner.layers):
                _run_layer(loader, model, i, layer, seqs, cov)
                bar.update(1)
        with step("golden: final norm and LM head", show_progress):
            logits = _head(loader, model, seqs)
    return logits, [sorted(s) for s in cov.hit]


def _embed(loader, model, rotary, token_lists, show_progress) -> list[Sequence]:
    import torch
    with step("golden: embedding", show_progress):
        emb = model.model.embed_tokens
        loader.load(emb, "model.embed_tokens.")
        seqs = [Sequence(model, rotary, emb(torch.tensor([t], dtype=torch.long))) for t in token_lists]
        loader.free(emb)
    return seqs


def _run_layer(loader, model, i: int, layer, seqs: list[Sequence], cov: Coverage) -> None:
    """Decoder layer i on every sequence, with the layer's weights loaded only meanwhile."""
    loader.load(layer, f"model.layers.{i}.")
    handle = layer.mlp.experts.register_forward_pre_hook(cov.hook(i), with_kwargs=True)
    layer_type = (getattr(model.config, "layer_types", None) or [None] * (i + 1))[i]
    try:
        for s in seqs:
            s.h = layer(s.h, attention_mask=s.mask(layer_type), position_ids=s.position_ids,
                        position_embeddings=s.position_embeddings)
    finally:
        handle.remove()
        loader.free(layer)


def _head(loader, model, seqs: list[Sequence]) -> list:
    """Final norm, then the LM head (tied to the embedding when the checkpoint has no lm_head)."""
    norm, head = model.model.norm, model.lm_head
    loader.load(norm, "model.norm.")
    prefix = "lm_head." if "lm_head.weight" in loader.files else "model.embed_tokens."
    loader.load(head, prefix)
    out = [head(norm(s.h))[0].float().numpy() for s in seqs]
    loader.free(norm)
    loader.free(head)
    return out
