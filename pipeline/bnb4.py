"""bitsandbytes 4-bit (NF4/FP4, QLoRA): the base model's weights as QLoRA training saw them, one
tensor at a time.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) trains the adapter against
``dequantize_4bit(W_4bit, quant_state)``: NF4/FP4 codes times their block absmax (itself
8-bit quantized under double quantization). That matrix, not the original 16-bit weight,
is what ``B @ A`` was fitted to.

:class:`BaseTensors` rebuilds it per tensor exactly as ``transformers`` (5.24) and
bitsandbytes (0.50) build it at load (``from_pretrained(quantization_config=...)``): the
decisions (which parameters are quantized, their load dtype, GPT-2 ``Conv1D`` transposes,
renamed or fused checkpoint keys) are transformers' own, taken from a meta-device skeleton
(:func:`load_plan`); the per-tensor path is ``ckpt.to(load_dtype) -> (.T for Conv1D) ->
quantize_4bit(blocksize 64, quant_type, double quant, quant_storage) -> dequantize_4bit``.
Tensors bitsandbytes never quantizes (embeddings, norms, ``lm_head``, MoE experts) are
``ckpt.to(load_dtype)``, never round-tripped through NF4. A base saved in 4-bit is
dequantized with its own stored quant state. Tests: ``tests/test_streaming.py`` (bit-equal
to transformers' load-in-4bit followed by ``dequantize_4bit``).

Caveat (measured): with double quantization the quant state's offset is a mean that torch
computes with a thread-count-dependent reduction, so a reconstruction matches a training
run's weights exactly only under the same ``torch.get_num_threads()``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pipeline.errors import InputError

BLOCKSIZE = 64  # Params4bit's default; transformers never overrides it


def check_not_repacked(model) -> None:
    """Refuse a model whose ``Linear4bit`` weights bitsandbytes has repacked for its CPU kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a ``Linear4bit`` weight into a
    CPU-specific layout on its first eval-mode forward (``quant_state.packing_format_for_cpu``).
    ``dequantize_4bit`` on such a weight returns garbage without an error, and bnb's inverse
    is lossy. :func:`pipeline.models.load_4bit_base` turns the repacking off.

    Raises:
        InputError: naming the first repacked layer.
    """
    import bitsandbytes as bnb

    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            raise InputError(
                f"layer '{name}' was repacked by bitsandbytes' CPU kernel during an eval-mode forward; "
                "its exact 4-bit weights are gone. Dequantize a freshly loaded model "
                "(pipeline.models.load_4bit_base keeps the repacking off)."
            )


def conv1d_names(config) -> set[str]:
    """Modules that are ``transformers.pytorch_utils.Conv1D`` (GPT-2 style, weight [in, out]) in
    the architecture of ``config``, read off a meta-device skeleton (no weights)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n for n, m in model.named_modules() if isinstance(m, Conv1D)}


def reconstruct(tensor: torch.Tensor, dq, load_dtype: torch.dtype, transpose: bool = False) -> torch.Tensor:
    """``dequantize_4bit`` of the ``Linear4bit`` weight transformers builds from checkpoint tensor ``tensor``.

    Args:
        tensor: the checkpoint tensor ([out, in]; [in, out] for a GPT-2 ``Conv1D``, with ``transpose``).
        dq: the ``dequantize`` config section (quant_type, double_quant, quant_storage).
        load_dtype: the ``dtype`` ``from_pretrained`` loaded the base in (QLoRA scripts pass the
            compute dtype); the weight is cast to it before quantization.
    Returns:
        The dequantized weight, ``load_dtype``, [out, in] (the ``Linear4bit`` layout).
    """
    import bitsandbytes.functional as F

    w = tensor.to(dtype=load_dtype)
    if transpose:
        w = w.T
    packed, state = F.quantize_4bit(
        w.contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=dq.double_quant,
        quant_type=dq.quant_type,
        quant_storage=getattr(torch, dq.quant_storage),
    )
    return F.dequantize_4bit(packed, state)


def dequantize_saved(packed: torch.Tensor, companions: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dequantize one weight of a checkpoint saved in bitsandbytes 4-bit from its stored quant state
    (``absmax``, ``quant_map``, ``nested_*``, the ``quant_state.bitsandbytes__*`` blob), as
    ``Params4bit.from_prequantized`` rebuilds it. Returns the stored quant-state dtype, [out, in]."""
    import bitsandbytes.functional as F

    state = F.QuantState.from_dict(qs_dict=dict(companions), device=torch.device("cpu"))
    return F.dequantize_4bit(packed, state)


@dataclass(frozen=True)
class KeyPlan:
    """What ``from_pretrained`` does with one checkpoint key: ``action`` is ``quantize``,
    ``passthrough``, ``prequantized`` (a saved 4-bit weight), ``companion`` (its quant state) or
    ``unexpected`` (dropped); ``target`` the parameter it feeds; ``dtype`` the load cast;
    ``transpose`` for a ``Conv1D``; ``converter`` the pattern of a fusing conversion (MoE experts)."""

    key: str
    target: str | None
    action: str
    dtype: torch.dtype | None
    transpose: bool = False
    converter: str | None = None


def skeleton(config, quantization_config=None, load_dtype: torch.dtype = torch.float32, trust_remote_code=False):
    """The model ``from_pretrained`` builds before reading weights, on the meta device (no memory):
    the same class, init context and quantizer preprocessing (``Linear4bit`` where bnb quantizes).

    Returns:
        (model, hf_quantizer or None, transformers' weight conversions for this model).
    """
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.models.auto.auto_factory import _get_model_class
    from transformers.quantizers.auto import get_hf_quantizer
    from transformers.utils.generic import ContextManagers

    config = copy.deepcopy(config)
    cls = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    hfq, config, device_map = get_hf_quantizer(config, quantization_config, {"": "cpu"}, True, {})
    config.dtype = load_dtype
    for sub in config.sub_configs:
        if getattr(config, sub, None) is not None:
            getattr(config, sub).dtype = load_dtype
    with ContextManagers(cls.get_init_context(load_dtype, hfq is not None, False, None)):
        model = cls(copy.deepcopy(config))
        if hfq is not None:
            hfq.preprocess_model(
                model=model, dtype=load_dtype, device_map=device_map, checkpoint_files=None, use_kernels=False
            )
    return model, hfq, get_model_conversion_mapping(model, None, hfq)


def quantize_skeleton(model, cfg, load_dtype: torch.dtype, ckpt):
    """Replace, on a skeleton, the modules bitsandbytes quantizes by ``Linear4bit`` (meta), with
    transformers' own preprocessing for the training ``BitsAndBytesConfig`` (or the saved base's)."""
    from transformers.quantizers.auto import get_hf_quantizer

    from pipeline.models import bnb_config

    qc = None if ckpt.is_bnb_4bit else bnb_config(cfg.dequantize)
    config = copy.deepcopy(model.config)
    if ckpt.is_bnb_4bit:
        config.quantization_config = ckpt.quantization_config
    hfq, _, device_map = get_hf_quantizer(config, qc, {"": "cpu"}, True, {})
    hfq.preprocess_model(model=model, dtype=load_dtype, device_map=device_map, checkpoint_files=None, use_kernels=False)
    return model


def load_plan(ckpt, config, quantization_config, load_dtype: torch.dtype, trust_remote_code=False) -> list[KeyPlan]:
    """transformers' per-key loading decisions for checkpoint ``ckpt`` (:class:`pipeline.checkpoint.Checkpoint`),
    reproduced from ``core_model_loading.convert_and_load_state_dict_in_model`` on a skeleton; headers only.

    Raises:
        InputError: a fusing conversion feeds a quantized parameter (quantized only after fusion:
            it cannot be rebuilt tensor by tensor).
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, build_glob_alternation
    from transformers.core_model_loading import dot_natural_key, rename_source_key
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import get_module_from_name

    model, hfq, conversions = skeleton(config, quantization_config, load_dtype, trust_remote_code)
    meta_sd = model.state_dict()
    renamings = [e for e in conversions if isinstance(e, WeightRenaming)]
    converters = [e for e in conversions if isinstance(e, WeightConverter)]
    by_pattern = {k: c for c in converters for k in c.source_patterns}
    dtype_plan = model._get_dtype_plan(load_dtype)
    if dtype_plan:
        alternation, by_group, _ = build_glob_alternation(list(dtype_plan.keys()))
    prefix = model.base_model_prefix
    companions = set()
    if hfq is not None and hfq.pre_quantized:
        companions = {n for ns in hfq.serialized_names.values() for n in ns}
    plans = []
    for key in sorted(ckpt.tensors, key=dot_natural_key):
        target, src = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if target not in meta_sd and key in meta_sd:
            target, src = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_sd)
        if target not in meta_sd:
            plans.append(KeyPlan(key, None, "unexpected", None))
            continue
        empty = meta_sd[target]
        quantize = bool(hfq and not hfq.pre_quantized and hfq.param_needs_quantization(model, target))
        dtype = load_dtype
        if dtype_plan and alternation.search(target):
            dtype = dtype_plan[by_group[alternation.search(target).lastgroup]]
        elif empty is not None and empty.dtype != dtype and not quantize:
            dtype = empty.dtype
        if hfq and hfq.pre_quantized:
            from transformers.core_model_loading import WeightRenaming as _R

            mapping = copy.deepcopy(by_pattern[src]) if src is not None else _R(key, target)
            dtype = hfq.get_new_dtype(mapping, _SliceInfo(ckpt.tensors[key]), dtype)
        module, _ = get_module_from_name(model, target)
        conv1d = issubclass(getattr(module, "source_cls", type(module)), Conv1D)
        is_companion = src in companions
        converter = None if (src is None or is_companion) else src
        if quantize:
            if converter is not None:
                raise InputError(
                    f"base tensor '{key}' is fused into '{target}' on load and then quantized; this "
                    "pipeline cannot rebuild that tensor by tensor."
                )
            plans.append(KeyPlan(key, target, "quantize", dtype, conv1d))
        elif is_companion and src != "weight":
            plans.append(KeyPlan(key, target, "companion", None, conv1d, src))
        elif is_companion and hfq.param_needs_quantization(model, target):
            plans.append(KeyPlan(key, target, "prequantized", None, conv1d, src))
        else:
            plans.append(KeyPlan(key, target, "passthrough", dtype, False, converter))
    return plans


class _SliceInfo:
    """The little of a safetensors slice that ``get_new_dtype`` reads: its dtype string (``"BF16"``)."""

    def __init__(self, info):
        self.dtype = info.dtype

    def get_dtype(self) -> str:
        return self.dtype


class BaseTensors:
    """The base model's parameters, one at a time, as training loaded them (float32 unless asked otherwise).

    ``source="dequantized"``: the 4-bit base as QLoRA training saw it (:func:`reconstruct`, or
    the stored quant state of a base saved in 4-bit); ``source="original"``: the checkpoint's
    full-precision tensors. Names are the model's parameter names (after transformers'
    renames); a fused parameter (MoE experts) is assembled from its checkpoint keys with
    transformers' conversion operations; a tied duplicate (``lm_head.weight``) reads its source.
    Every :meth:`get` returns fresh memory (callers merge in place).
    """

    def __init__(self, ckpt, cfg, source: str = "dequantized", device: str = "cpu"):
        from transformers import AutoConfig

        from pipeline.common import DTYPES
        from pipeline.models import bnb_config

        self.ckpt, self.dq, self.source, self.device = ckpt, cfg.dequantize, source, device
        self.config = config = AutoConfig.from_pretrained(ckpt.folder, trust_remote_code=cfg.base.trust_remote_code)
        saved_qc = ckpt.quantization_config
        if source == "original" and ckpt.is_bnb_4bit:
            raise InputError("merge.base 'original' needs the full-precision base; base.path is saved in 4-bit.")
        if ckpt.is_bnb_4bit:
            qc, compute = None, str(saved_qc.get("bnb_4bit_compute_dtype") or cfg.dequantize.compute_dtype)
        else:
            qc, compute = (
                (bnb_config(cfg.dequantize) if source == "dequantized" else None),
                cfg.dequantize.compute_dtype,
            )
        self.load_dtype = DTYPES[compute.removeprefix("torch.")] if source == "dequantized" else torch.float32
        self.plans = load_plan(ckpt, config, qc, self.load_dtype, cfg.base.trust_remote_code)
        self.by_target: dict[str, list[KeyPlan]] = {}
        for p in self.plans:
            if p.target is not None:
                self.by_target.setdefault(p.target, []).append(p)
        self._converters = None

    @property
    def targets(self) -> list[str]:
        """Every parameter (or persistent buffer) name the checkpoint feeds, in checkpoint order."""
        return list(self.by_target)

    def quantized(self, name: str) -> bool:
        """Whether training saw parameter ``name`` in 4-bit."""
        return any(p.action in ("quantize", "prequantized") for p in self.by_target.get(name, []))

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Parameter ``name`` as training loaded it, in the model's layout, converted to ``dtype``
        (float32 by default; the merge works in it).

        A tensor loaded as it is stored (embeddings, norms, ``lm_head``) is converted while it is
        read, without a float32 copy in between: ``ckpt -> load dtype -> dtype`` gives the values
        of ``ckpt -> load dtype -> float32 -> dtype`` (widening to float32 is exact; only NaN
        payloads may differ).

        Raises:
            KeyError: the checkpoint does not feed ``name``.
        """
        plans = self.by_target[name]
        head = plans[0]
        if head.action == "quantize":
            t = reconstruct(self.ckpt.get(head.key).to(self.device), self.dq, head.dtype, head.transpose)
            t = t.T if head.transpose else t
        elif head.action in ("prequantized", "companion"):
            main = next(p for p in plans if p.action == "prequantized")
            comps = {p.key[len(main.key) + 1 :]: self.ckpt.get(p.key) for p in plans if p.action == "companion"}
            t = dequantize_saved(self.ckpt.get(main.key).to(self.device), comps)
            t = t.T if main.transpose else t
        elif head.converter is not None:
            t = self._fused(name, plans)
        else:
            return self.ckpt.get(head.key, dtype=dtype, via=head.dtype)  # fresh memory
        return t.to(dtype).contiguous()  # fresh memory: every read allocates its own

    def params4bit(self, name: str, meta_param, device: str = "cpu"):
        """The ``Params4bit`` of 4-bit parameter ``name`` exactly as transformers materializes it:
        ``Params4bit(ckpt.to(load_dtype)[.T], **meta_param.__dict__).to(device)`` (bitsandbytes
        quantizes on ``.to``), or ``Params4bit.from_prequantized`` for a base saved in 4-bit."""
        import bitsandbytes as bnb

        plans = self.by_target[name]
        main = next(p for p in plans if p.action in ("quantize", "prequantized"))
        if main.action == "quantize":
            w = self.ckpt.get(main.key).to(main.dtype)
            w = w.T if main.transpose else w
            return bnb.nn.Params4bit(w, requires_grad=False, **meta_param.__dict__).to(device)
        stats = {p.key[len(main.key) + 1 :]: self.ckpt.get(p.key) for p in plans if p.action == "companion"}
        return bnb.nn.Params4bit.from_prequantized(
            data=self.ckpt.get(main.key), quantized_stats=stats, requires_grad=False, device=device
        )

    def checkpoint_pieces(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``tensor`` (parameter ``name``) under the checkpoint key(s) it was loaded from: a fused
        parameter is split back into the base checkpoint's keys (the layout serving stacks read),
        anything else keeps its name."""
        plans = self.by_target.get(name, [])
        if not plans or plans[0].converter is None:
            return [(name, tensor)]
        from transformers.core_model_loading import Concatenate, MergeModulelist

        conv = self._converter(plans[0].converter)
        prefix = name[: len(name) - len(next(t for t in conv.target_patterns if name.endswith(t)))]
        groups = self._source_groups(conv, prefix, plans)
        pieces: list = [tensor]
        for op in reversed(conv.operations):
            if isinstance(op, Concatenate):
                sizes = [self.ckpt.tensors[g[0].key].shape[op.dim - 1] for g in groups]
                pieces = list(torch.split(pieces[0], sizes, dim=op.dim))
            elif isinstance(op, MergeModulelist):
                pieces = [list(torch.unbind(p, dim=op.dim)) for p in pieces]
        return [(p.key, t.contiguous()) for g, ts in zip(groups, pieces) for p, t in zip(g, ts)]

    @staticmethod
    def _source_groups(conv, prefix: str, plans: list[KeyPlan]) -> list[list[KeyPlan]]:
        """The checkpoint keys of a fused parameter, one list per source pattern, in index order."""
        import re

        groups = []
        for src in conv.source_patterns:
            rx = re.compile(re.escape(prefix + src).replace(r"\*", r"(\d+)") + "$")
            hits = [(int(m.group(1)), p) for p in plans if (m := rx.match(p.key))]
            groups.append([p for _, p in sorted(hits, key=lambda h: h[0])])
        return groups

    def _fused(self, name: str, plans: list[KeyPlan]) -> torch.Tensor:
        """A parameter transformers assembles from several checkpoint keys (``MergeModulelist`` then
        ``Concatenate``, as for Qwen3-MoE experts), each key cast first as the loader casts it."""
        from transformers.core_model_loading import Concatenate, MergeModulelist

        conv = self._converter(plans[0].converter)
        prefix = name[: len(name) - len(next(t for t in conv.target_patterns if name.endswith(t)))]
        pieces = [[self.ckpt.get(p.key).to(p.dtype) for p in g] for g in self._source_groups(conv, prefix, plans)]
        for op in conv.operations:
            if isinstance(op, MergeModulelist):
                pieces = [torch.stack(p, dim=op.dim) if isinstance(p, list) else p for p in pieces]
            elif isinstance(op, Concatenate):
                pieces = [torch.cat(pieces, dim=op.dim)]
            else:
                raise InputError(
                    f"base parameter '{name}' is built on load by {type(op).__name__}, which this "
                    "pipeline does not reproduce tensor by tensor."
                )
        return pieces[0]

    def _converter(self, source_pattern: str):
        if self._converters is None:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter

            model, _, _ = skeleton(self.config, None, torch.float32)
            self._converters = [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightConverter)]
        return next(c for c in self._converters if source_pattern in c.source_patterns)
