"""Baselines built in memory, for scale in the report (``eval.baselines``):

* ``peft_4bit_merge``: PEFT's ``merge_and_unload()`` on the 4-bit model, which re-quantizes
  each merged weight to NF4 (what most QLoRA tutorials do);
* ``bnb_nf4``: the merged model loaded in bitsandbytes NF4 (double quantization), no calibration;
* ``rtn``: round-to-nearest of the merged model at the GPTQ setting's bits and group size
  (no calibration): what GPTQ's error compensation buys.

The naive merge onto the original 16-bit weights is the ``merged-original`` variant.
"""

from __future__ import annotations

import torch

from pipeline import gptq
from pipeline.models import bnb_config, disable_bnb_cpu_repacking, load_causal_lm, reference_model, scoring_dtype


@torch.no_grad()
def rtn_(model, bits: int, group_size: int, sym: bool = True, skip=("lm_head",)) -> int:
    """Round-to-nearest fake quantization of every ``nn.Linear`` weight [out, in], in place.

    Per group of ``group_size`` input columns (``-1``: the whole row): symmetric
    ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, ``s = max|w| / (2^(b-1) - 1)``; asymmetric
    ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``s = (max - min) / (2^b - 1)``. Weights become
    ``s * q`` (or ``s * (q - z)``). Returns the number of weights quantized.
    """
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.split(".")[-1] in skip:
            continue
        w = m.weight.float()
        g = w.shape[1] if group_size == -1 else group_size
        wg = w.reshape(w.shape[0], -1, g)
        if sym:
            qmax = 2 ** (bits - 1) - 1
            s = wg.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
            q = (wg / s).round().clamp(-qmax - 1, qmax) * s
        else:
            lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
            s = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
            z = (-lo / s).round()
            q = ((wg / s).round() + z).clamp(0, 2**bits - 1).sub(z) * s
        m.weight.copy_(q.reshape_as(w).to(m.weight.dtype))
        n += w.numel()
    return n


def bnb_nf4_model(path, cfg, device: str, dtype: torch.dtype):
    """The checkpoint at ``path`` loaded in bitsandbytes NF4 (double quantization, uint8 storage,
    blocks of 64), computing in ``dtype``: bitsandbytes' round-to-nearest of every linear.

    bitsandbytes' AVX512-BF16 CPU kernel is kept off (:func:`disable_bnb_cpu_repacking`), so on
    CPU the model dequantizes and multiplies in ``dtype``, as the reference does, and not in bf16.
    """
    nf4 = cfg.dequantize.model_copy(update={"quant_type": "nf4", "double_quant": True, "quant_storage": "uint8"})
    compute = str(dtype).removeprefix("torch.")
    model = load_causal_lm(path, cfg, device=device, dtype=dtype, quantization_config=bnb_config(nf4, compute))
    disable_bnb_cpu_repacking(model)
    return model


def load(cfg, name: str, device: str):
    """(model, path description, size_bytes) of baseline ``name``."""
    layout, rq = cfg.layout, cfg.requantize
    dtype = scoring_dtype(cfg.out_dtype, device)
    if name == "peft_4bit_merge":
        model = reference_model(cfg, cfg.effective_adapter, device).merge_and_unload()
        disable_bnb_cpu_repacking(model)  # merge_and_unload re-creates each Linear4bit, kernel flag reset
        return model, "PEFT merge_and_unload() on the 4-bit model", model.get_memory_footprint()
    if name == "bnb_nf4":
        model = bnb_nf4_model(layout.merged, cfg, device, dtype)
        return model, f"{layout.merged} in bitsandbytes NF4", model.get_memory_footprint()
    if name == "rtn":
        model = load_causal_lm(layout.merged, cfg, device=device, dtype=dtype)
        n = rtn_(model, rq.bits, rq.group_size, rq.sym)
        rest = sum(p.numel() for p in model.parameters()) - n  # kept in fp16, as in a GPTQ checkpoint
        size = int(n * gptq.bits_per_weight(rq) / 8 + 2 * rest)  # estimated: the GPTQ layout at this setting
        return model, f"{layout.merged} round-to-nearest {rq.bits}-bit g{rq.group_size}", size
    raise ValueError(f"unknown baseline {name}")
