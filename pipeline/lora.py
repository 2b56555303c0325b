"""The LoRA merge, one module at a time, with PEFT's own per-layer math.

``W' = W + scaling * B @ A`` with PEFT's rules (``lora_alpha / r``, ``lora_alpha / sqrt(r)``
with rsLoRA, per-module ``rank_pattern``/``alpha_pattern``, DoRA's magnitude renormalisation,
LoRA on embeddings, ``lora_bias``, ``modules_to_save``, trainable tokens, LoRA on parameters
such as MoE experts) is computed by PEFT itself (``peft/tuners/lora/layer.py``: ``merge``,
``get_delta_weight``; ``peft/utils/other.py``: the wrappers), never by hand-written formulas.

How: the model is built on the meta device (no memory), the adapter is attached with
``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)`` (adapter tensors real, on the CPU),
and for each PEFT wrapper the real base tensors are swapped in, the wrapper's own ``merge()``
runs, the result is read out, and the meta placeholders go back (:func:`iter_merged`). At most
one module's base tensors are in memory.

Tied input/output embeddings: each side is computed from its own wrapper on its own copy of
the shared matrix, so the merged pair equals what the unmerged PeftModel computes, in every
way PEFT ties (or does not tie) an adapter to a tied ``lm_head``. PEFT's ``merge_and_unload``
on a tied model merges both sides into one shared Parameter and, for some forms, adds the
shared delta twice (PEFT issue 2777, PR 2399). :func:`resolve_tie` keeps the tie only where
both sides stay equal.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn


def build_skeleton(config, **overrides):
    """The causal LM of ``config`` (a ``PretrainedConfig``) on the meta device in float32, with
    config ``overrides`` (e.g. ``vocab_size`` of a vocabulary resized in training). Tied weights
    are tied (``lm_head.weight is model.embed_tokens.weight``)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    for k, v in overrides.items():
        setattr(config, k, v)
        if getattr(config, "text_config", None) is not None and hasattr(config.text_config, k):
            setattr(config.text_config, k, v)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{duplicate parameter name: first name}`` for parameters shared by several modules
    (``{"lm_head.weight": "model.embed_tokens.weight"}`` for a tied causal LM)."""
    first: dict[int, str] = {}
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[n] = first[id(p)]
        else:
            first[id(p)] = n
    return out


# --- attaching the adapter to a skeleton ------------------------------------------------------


def _to_cpu_unless_meta(layer, adapter_name: str, dtype) -> None:
    """PEFT's ``_move_adapter_to_device_of_base_layer`` loop with the CPU as target: real adapter
    tensors go to the CPU (cast to the base dtype when floating, as PEFT casts them), meta ones stay."""
    from peft.tuners._buffer_dict import BufferDict

    for layer_name in layer.adapter_layer_names + layer.other_param_names:
        container = getattr(layer, layer_name, None)
        if not isinstance(container, (nn.ModuleDict, nn.ParameterDict, BufferDict)) or adapter_name not in container:
            continue
        item = container[adapter_name]
        tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, nn.Module) else [item]
        if any(t.device.type == "meta" for t in tensors):
            continue
        item_dtype = getattr(item, "dtype", None)
        floating = item_dtype is None or item_dtype.is_floating_point or item_dtype.is_complex
        if dtype is not None and dtype.is_floating_point and floating:
            container[adapter_name] = item.to("cpu", dtype=dtype)
        else:
            container[adapter_name] = item.to("cpu")


@contextlib.contextmanager
def keep_adapters_off_meta():
    """While active, PEFT moves loaded adapter tensors to the CPU instead of to the (meta) device
    of a skeleton's base layer. Without it PEFT 0.21 silently leaves every LoRA tensor on meta
    (``set_peft_model_state_dict(low_cpu_mem_usage=True)`` then ``_move_adapter_to_device_of_base_layer``)."""
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    orig_base = BaseTunerLayer._move_adapter_to_device_of_base_layer
    orig_param = ParamWrapper._move_adapter_to_device_of_base_layer

    def move_base(self, adapter_name, device=None):
        if device is None:
            base = self.get_base_layer()
            if isinstance(base, nn.MultiheadAttention):
                base = base.out_proj
            base_device, base_dtype = self._get_base_layer_device_and_dtype(base)
            if base_device is not None and base_device.type == "meta":
                return _to_cpu_unless_meta(self, adapter_name, base_dtype)
        return orig_base(self, adapter_name, device=device)

    def move_param(self, adapter_name, device=None):
        param = self.get_param()
        if param.device.type == "meta":
            return _to_cpu_unless_meta(self, adapter_name, param.dtype)
        return orig_param(self, adapter_name, device=device)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = move_base
    ParamWrapper._move_adapter_to_device_of_base_layer = move_param
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = orig_base
        ParamWrapper._move_adapter_to_device_of_base_layer = orig_param


def attach_adapter(skeleton, adapter_dir, adapter_name: str = "default"):
    """``PeftModel.from_pretrained(skeleton, adapter_dir, low_cpu_mem_usage=True)`` with the adapter
    tensors real on the CPU and the base tensors left on meta.

    Raises:
        RuntimeError: an adapter tensor is still on meta afterwards (a key missing from the file).
    """
    from peft import PeftModel

    with keep_adapters_off_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tie_word_embeddings / save_embedding_layers notices
        pm = PeftModel.from_pretrained(
            skeleton, str(adapter_dir), adapter_name=adapter_name, low_cpu_mem_usage=True, torch_device="cpu"
        )
    pm.eval()
    missing = [n for n, p in adapter_tensors(pm).items() if p.device.type == "meta"]
    if missing:
        raise RuntimeError(f"{len(missing)} adapter tensors were not loaded from {adapter_dir}, e.g. {missing[:3]}")
    return pm


def load_more_adapter(pm, adapter_dir, adapter_name: str):
    """A second adapter on the skeleton PeftModel (for ``adapter.combine``)."""
    with keep_adapters_off_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.load_adapter(str(adapter_dir), adapter_name=adapter_name, low_cpu_mem_usage=True, torch_device="cpu")
    return pm


@contextlib.contextmanager
def _zero_stride_base_weights(pm):
    """Give every LoRA base layer a zero-stride CPU weight (one element of memory) instead of meta,
    so that adapters PEFT creates itself (``add_weighted_adapter``) land on the CPU."""
    from peft.tuners.lora.layer import LoraLayer

    old = []
    for m in pm.modules():
        if isinstance(m, LoraLayer):
            base = m.get_base_layer()
            p = base._parameters.get("weight")
            if p is not None and p.device.type == "meta":
                old.append((base, p))
                base._parameters["weight"] = nn.Parameter(
                    torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False
                )
    try:
        yield
    finally:
        for base, p in old:
            base._parameters["weight"] = p


def add_weighted_adapter(pm, names, weights, adapter_name, **kw):
    """PEFT's ``add_weighted_adapter`` on a skeleton PeftModel; the combined adapter becomes active."""
    with _zero_stride_base_weights(pm):
        pm.add_weighted_adapter(names, weights, adapter_name, **kw)
    pm.set_adapter(adapter_name)
    return pm


def adapter_tensors(pm) -> dict[str, torch.Tensor]:
    """Every adapter tensor of a PeftModel (LoRA factors, DoRA magnitudes, ``modules_to_save`` copies,
    trainable-token rows), by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, TrainableTokensWrapper

    out = {}
    for mname, m in pm.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            for a, sub in m.modules_to_save.items():
                for n, p in sub.named_parameters(remove_duplicate=False):
                    if "base_layer" not in n:
                        out[f"{mname}.modules_to_save.{a}.{n}"] = p
        elif isinstance(m, TrainableTokensWrapper):
            for a, p in m.token_adapter.trainable_tokens_delta.items():
                out[f"{mname}.token_adapter.trainable_tokens_delta.{a}"] = p
        elif isinstance(m, BaseTunerLayer) and not isinstance(m, AuxiliaryTrainingWrapper):
            for n, p in m.named_parameters(remove_duplicate=False):
                if not n.startswith("base_layer.") and ".base_layer." not in n:
                    out[f"{mname}.{n}"] = p
    return out


# --- the per-module merge -----------------------------------------------------------------------


@dataclass
class Unit:
    """One merge unit: a PEFT wrapper at its original module name, or a plain module owning parameters."""

    name: str
    kind: str  # "lora" | "param_lora" | "modules_to_save" | "trainable_tokens" | "plain"
    module: nn.Module


def iter_units(pm) -> Iterator[Unit]:
    """The merge units of a PeftModel, in module order."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    kinds = (
        (ModulesToSaveWrapper, "modules_to_save"),
        (TrainableTokensWrapper, "trainable_tokens"),
        (ParamWrapper, "param_lora"),
        (LoraLayer, "lora"),
    )

    def walk(module, prefix):
        for cls, kind in kinds:
            if isinstance(module, cls):
                yield Unit(prefix, kind, module)
                return
        if any(True for _ in module.named_parameters(recurse=False)):
            yield Unit(prefix, "plain", module)
        for cname, child in module.named_children():
            yield from walk(child, f"{prefix}.{cname}" if prefix else cname)

    yield from walk(pm.base_model.model, "")


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@contextlib.contextmanager
def _real_params(module: nn.Module, prefix: str, load: Callable[[str], torch.Tensor]):
    """Swap real float32 tensors into ``module``'s own parameters (meta ones from ``load``; real
    ones, which the adapter file supplied, cloned), then put the original Parameters back."""
    old = {}
    try:
        for pn, p in list(module._parameters.items()):
            if p is None:
                continue
            t = load(_full(prefix, pn)) if p.device.type == "meta" else p.detach().clone()
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"base tensor '{_full(prefix, pn)}' has shape {list(t.shape)}, the model expects {list(p.shape)}"
                )
            old[pn] = p
            module._parameters[pn] = nn.Parameter(t, requires_grad=False)
        yield
    finally:
        for pn, p in old.items():
            module._parameters[pn] = p


def _read(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {_full(prefix, pn): p.detach() for pn, p in module._parameters.items() if p is not None}


def _reset(layer) -> None:
    """Forget a merge (``merged_adapters``, DoRA's cached weight norm) so the layer can merge again."""
    layer.merged_adapters.clear()
    if hasattr(layer, "_caches"):
        layer._caches.clear()
    for dora in getattr(layer, "lora_magnitude_vector", {}).values():
        if hasattr(dora, "_cache_clear"):
            dora._cache_clear()


def _merge_lora(layer, prefix: str, load) -> dict[str, torch.Tensor]:
    """``lora.Linear`` / ``lora.Embedding`` / GPT-2 ``Conv1D``: ``layer.merge()`` on real base tensors."""
    base = layer.get_base_layer()
    with _real_params(base, prefix, load):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer.merge()
            return _read(base, prefix)
        finally:
            _reset(layer)


def _merge_param_wrapper(outer, prefix: str, load) -> dict[str, torch.Tensor]:
    """A chain of ``lora.ParamWrapper`` (``target_parameters``, e.g. MoE experts): each wrapper's
    ``merge()``, outer first, as ``ParamWrapper.unload_and_optionally_merge_module`` does."""
    from peft.tuners.lora.layer import ParamWrapper

    chain = [outer]
    base = outer.base_layer
    while isinstance(base, ParamWrapper):
        chain.append(base)
        base = base.base_layer
    with _real_params(base, prefix, load):
        try:
            for w in chain:
                w.merge()
            out = _read(base, prefix)
        finally:
            for w in chain:
                _reset(w)
    for cname, child in base.named_children():
        for pn, p in child.named_parameters():
            name = _full(prefix, f"{cname}.{pn}")
            out[name] = load(name) if p.device.type == "meta" else p.detach().clone()
    return out


def _merge_modules_to_save(wrapper, prefix: str, load) -> dict[str, torch.Tensor]:
    """``ModulesToSaveWrapper``: the active adapter's trained copy replaces the module."""
    new = wrapper.modules_to_save[wrapper.active_adapter]
    if hasattr(new, "base_layer"):
        return _merge_lora(new, prefix, load)
    out = {}
    for n, p in new.named_parameters(remove_duplicate=False):
        if p.device.type == "meta":
            raise RuntimeError(f"{prefix}: the modules_to_save copy '{n}' is not in the adapter file")
        out[_full(prefix, n)] = p.detach().clone()
    return out


def _merge_trainable_tokens(wrapper, prefix: str, load) -> dict[str, torch.Tensor]:
    """``TrainableTokensWrapper`` (also a tied ``lm_head`` sharing the embedding's rows): the
    trained rows copied into a real base matrix (``TrainableTokensLayer.merge``)."""
    layer = wrapper.token_adapter
    base = layer.get_base_layer()
    with _real_params(base, prefix, load):
        try:
            layer.merge()
            return _read(base, prefix)
        finally:
            layer.merged_adapters.clear()


def merge_unit(unit: Unit, load, load_plain=None) -> dict[str, torch.Tensor]:
    """The merged float32 tensors of one unit, by parameter name.

    ``load_plain``: where a plain module's own base parameters come from (default ``load``); the
    merge leaves them as they are, so a caller that casts them afterwards can read them in the
    output dtype directly (no float32 copy of a vocabulary-sized matrix)."""
    if unit.kind == "lora":
        return _merge_lora(unit.module, unit.name, load)
    if unit.kind == "param_lora":
        return _merge_param_wrapper(unit.module, unit.name, load)
    if unit.kind == "modules_to_save":
        return _merge_modules_to_save(unit.module, unit.name, load)
    if unit.kind == "trainable_tokens":
        return _merge_trainable_tokens(unit.module, unit.name, load)
    # a plain module: its own parameters; real ones came from the adapter file (trained biases,
    # saved embedding layers), meta ones from the base
    load_plain = load_plain or load
    return {
        _full(unit.name, pn): (load_plain(_full(unit.name, pn)) if p.device.type == "meta" else p.detach().clone())
        for pn, p in unit.module.named_parameters(recurse=False)
    }


def iter_merged(pm, load: Callable[[str], torch.Tensor], load_plain=None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(parameter name, merged float32 tensor)`` for every parameter of the base model, one module at
    a time; ``load(name)`` gives a base parameter as training loaded it (fresh memory, float32);
    ``load_plain``: see :func:`merge_unit`. Tied duplicates (``lm_head.weight``) come separately,
    each from its own wrapper. Each unit's tensors are released before the next unit is merged."""
    for unit in iter_units(pm):
        merged = merge_unit(unit, load, load_plain)
        while merged:
            name = next(iter(merged))
            yield name, merged.pop(name)


def resolve_tie(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether a tied pair stays tied after the merge: only when both merged sides are equal."""
    return first.shape == second.shape and torch.equal(first, second)
