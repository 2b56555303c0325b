"""Stage 1, dequantize: the 4-bit base back to plain ``nn.Linear`` weights, exactly as the
adapter saw them during QLoRA training.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) trains the adapter against
``dequantize_4bit(W_4bit, quant_state)``: NF4/FP4 codes times their block absmax (itself
8-bit quantized under double quantization). That dequantized matrix, not the original
16-bit weight, is what ``B @ A`` was fitted to, so it is the merge base.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.common import DTYPES, log, pick_device, publish_dir, stage_record
from pipeline.errors import InputError

import torch  # noqa: E402  (after pipeline.common quiets library start-up)


def bnb_config(cfg):
    """The ``BitsAndBytesConfig`` that reproduces QLoRA training's 4-bit base from ``cfg.dequantize``."""
    from transformers import BitsAndBytesConfig
    d = cfg.dequantize
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=d.quant_type,
        bnb_4bit_use_double_quant=d.double_quant,
        bnb_4bit_compute_dtype=DTYPES[d.compute_dtype],
        bnb_4bit_quant_storage=getattr(torch, d.quant_storage),
    )


def base_quantization_config(path: str) -> dict | None:
    """``quantization_config`` of a local checkpoint's ``config.json`` (None when absent or not local)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    return json.loads(cfg_file.read_text()).get("quantization_config")


def load_4bit_base(cfg, device: str | None = None):
    """Load the base model in 4-bit as QLoRA training did.

    A full-precision checkpoint is quantized on load with :func:`bnb_config`; a
    checkpoint already saved in bitsandbytes 4-bit (``quantization_config`` with
    ``load_in_4bit``) is loaded with its own quant state. Non-quantized modules
    (embeddings, norms, ``lm_head``) are loaded in the compute dtype, as QLoRA
    training scripts do (``torch_dtype=bnb_4bit_compute_dtype``).

    bitsandbytes' AVX512-BF16 CPU inference kernel is disabled on the returned model: it
    repacks weights in place and computes in bf16, unlike the training-time forward.

    Returns:
        ``transformers`` causal LM whose targeted linears are ``bnb.nn.Linear4bit``.
    Raises:
        InputError: the base is quantized with something other than bnb 4-bit
            (e.g. GPTQ): an adapter trained on it cannot be merged this way.
    """
    from transformers import AutoModelForCausalLM
    device = device or pick_device(cfg.dequantize.device)
    qc = base_quantization_config(cfg.base.path)
    kwargs: dict = {}
    if qc is None:
        kwargs["quantization_config"] = bnb_config(cfg)
    elif qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise InputError(f"base '{cfg.base.path}' is quantized with '{qc.get('quant_method')}', not bitsandbytes 4-bit; "
                         "QLoRA merging needs the bnb 4-bit or the full-precision base the adapter was trained on.")
    else:
        log(f"base is a saved bnb 4-bit checkpoint ({qc.get('bnb_4bit_quant_type')}, "
            f"double quant {qc.get('bnb_4bit_use_double_quant')}); its own quant state is used")
    compute = (qc or {}).get("bnb_4bit_compute_dtype") or cfg.dequantize.compute_dtype
    model = AutoModelForCausalLM.from_pretrained(
        cfg.base.path, dtype=DTYPES[compute], device_map={"": device},
        trust_remote_code=cfg.base.trust_remote_code, **kwargs,
    )
    import bitsandbytes as bnb
    for m in model.modules():
        # Training-mode forwards dequantize and matmul in the compute dtype. bnb's CPU
        # inference kernel (AVX512-BF16, eval mode) repacks the weight in place and computes
        # in bf16 whatever the compute dtype: keep it off so the model computes as in training.
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def check_not_repacked(model) -> None:
    """Refuse a model whose ``Linear4bit`` weights bitsandbytes has repacked for its CPU kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a ``Linear4bit`` weight into a
    CPU-specific layout on its first eval-mode forward (``quant_state.packing_format_for_cpu``).
    ``dequantize_4bit`` on such a weight returns garbage without an error, and bnb's inverse
    is lossy (block absmax kept in bf16). :func:`load_4bit_base` turns the repacking off.

    Raises:
        InputError: naming the first repacked layer.
    """
    import bitsandbytes as bnb
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            raise InputError(f"layer '{name}' was repacked by bitsandbytes' CPU kernel during an eval-mode forward; "
                             "its exact 4-bit weights are gone. Dequantize a freshly loaded model "
                             "(pipeline.dequantize.load_4bit_base keeps the repacking off).")


def _conv1d_names(model) -> set[str]:
    """Modules that are ``transformers.pytorch_utils.Conv1D`` (GPT-2 style) in the architecture.

    bitsandbytes replaces them by ``Linear4bit`` (weight transposed to [out, in]); read the
    original types off a meta-device copy of the architecture."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    return {n for n, m in skeleton.named_modules() if isinstance(m, Conv1D)}


def _restore_conv1d(model, names: set[str]) -> None:
    """Turn the dequantized ``nn.Linear`` of each former ``Conv1D`` back into a ``Conv1D``
    (weight [in, out]), so the checkpoint keeps the architecture's layout and reloads."""
    from transformers.pytorch_utils import Conv1D
    for name in names:
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        if isinstance(lin, Conv1D):
            continue
        conv = Conv1D(lin.out_features, lin.in_features).to(device=lin.weight.device, dtype=lin.weight.dtype)
        conv.weight = torch.nn.Parameter(lin.weight.detach().t().contiguous(), requires_grad=False)
        if lin.bias is not None:
            conv.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        setattr(model.get_submodule(parent) if parent else model, child, conv)


def dequantize_model(model, dtype: torch.dtype):
    """Replace every ``bnb.nn.Linear4bit`` of ``model`` by an ``nn.Linear`` holding
    ``dequantize_4bit(weight, quant_state)`` cast to ``dtype``, and cast the rest of the
    model to ``dtype``. Drops ``config.quantization_config``. In place; returns the model.

    Uses ``transformers``' ``PreTrainedModel.dequantize`` (which calls
    ``bitsandbytes.functional.dequantize_4bit`` per layer) after :func:`check_not_repacked`;
    GPT-2 style ``Conv1D`` layers are restored as ``Conv1D`` (weight [in, out]).

    Raises:
        InputError: a layer's weight was repacked for bnb's CPU kernel.
    """
    check_not_repacked(model)
    conv1d = _conv1d_names(model)
    model = model.dequantize(dtype=dtype)
    _restore_conv1d(model, conv1d)
    model.to(dtype)
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.dtype = dtype
    return model


def run(cfg) -> Path:
    """Stage entry: load the 4-bit base, dequantize it, save ``<run_dir>/dequantized``.

    Returns:
        Path of the dequantized checkpoint (safetensors, ``cfg.out_dtype``).
    """
    from transformers import AutoTokenizer
    out = cfg.run_dir / "dequantized"
    from pipeline.adapter_checks import check_adapter
    with stage_record(cfg.run_dir, "dequantize") as rec:
        check_adapter(cfg)  # refuse an unmergeable pair before hours of work
        device = pick_device(cfg.dequantize.device)
        log(f"dequantize: loading base '{cfg.base.path}' in 4-bit on {device}")
        model = load_4bit_base(cfg, device)
        import bitsandbytes as bnb
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        if n4 == 0:
            raise InputError(f"base '{cfg.base.path}' has no linear layer bitsandbytes can quantize.")
        log(f"dequantize: {n4} Linear4bit layers -> nn.Linear {cfg.out_dtype}")
        model = dequantize_model(model, DTYPES[cfg.out_dtype]).to("cpu")
        tok = AutoTokenizer.from_pretrained(cfg.base.path, trust_remote_code=cfg.base.trust_remote_code)
        with publish_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        rec.update(artefact=str(out), linear4bit_layers=n4, device=device,
                   dtype=cfg.out_dtype, quant_type=cfg.dequantize.quant_type,
                   double_quant=cfg.dequantize.double_quant, compute_dtype=cfg.dequantize.compute_dtype)
    return out
