"""bitsandbytes 4-bit (NF4/FP4, QLoRA): everything this project does with bnb-quantized weights.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) trains the adapter against
``dequantize_4bit(W_4bit, quant_state)``: NF4/FP4 codes times their block absmax (itself
8-bit quantized under double quantization). That matrix, not the original 16-bit weight,
is what ``B @ A`` was fitted to.
"""

from __future__ import annotations

import torch

from pipeline.errors import InputError


def check_not_repacked(model) -> None:
    """Refuse a model whose ``Linear4bit`` weights bitsandbytes has repacked for its CPU kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a ``Linear4bit`` weight into a
    CPU-specific layout on its first eval-mode forward (``quant_state.packing_format_for_cpu``).
    ``dequantize_4bit`` on such a weight returns garbage without an error, and bnb's inverse
    is lossy (block absmax kept in bf16). :func:`pipeline.models.load_4bit_base` turns the
    repacking off.

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
        skeleton = AutoModelForCausalLM.from_config(config)
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
    conv1d = conv1d_names(model.config)
    model = model.dequantize(dtype=dtype)
    _restore_conv1d(model, conv1d)
    model.to(dtype)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.dtype = dtype
    return model


def count_linear4bit(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
