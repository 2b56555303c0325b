"""Stage 2, merge: fold the LoRA adapter into the dequantized base weights.

For each adapted linear, ``W' = W_deq + scaling * B @ A`` with PEFT's scaling rules
(``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA; per-module ``rank_pattern``
/ ``alpha_pattern``; DoRA's magnitude renormalisation), computed by PEFT itself
(``peft/tuners/lora/layer.py``, ``LoraLayer.get_delta_weight``) through
``merge_and_unload()`` on the *dequantized* model, in float32, then cast once to the
output dtype. (``merge_and_unload()`` on the 4-bit model would re-quantize to NF4 and
round most of the adapter away.)

The merged checkpoint is written to ``<run_dir>/merged.unverified``; the verify stage
publishes it as ``<run_dir>/merged`` only if it passes.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.common import DTYPES, log, publish_dir, stage_record
from pipeline.errors import InputError

import torch  # noqa: E402

MERGEABLE_PEFT_TYPES = {"LORA"}


def read_adapter_config(path: str) -> dict:
    """``adapter_config.json`` of a local adapter folder, checked for a mergeable PEFT type.

    Raises:
        InputError: missing file, unsupported ``peft_type``, or missing weights.
    """
    p = Path(path)
    if not p.exists():  # hub id: PEFT resolves it
        return {}
    f = p / "adapter_config.json"
    if not f.is_file():
        raise InputError(f"adapter '{path}' has no adapter_config.json; is it a PEFT adapter folder?")
    try:
        acfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{f} is not valid JSON: {e}") from None
    if acfg.get("peft_type") not in MERGEABLE_PEFT_TYPES:
        raise InputError(f"adapter '{path}' is of PEFT type '{acfg.get('peft_type')}'; only LoRA (incl. rsLoRA, DoRA) "
                         "adapters can be merged into the weights.")
    if not (p / "adapter_model.safetensors").is_file():
        raise InputError(f"adapter '{path}' has no adapter_model.safetensors (a pickle adapter_model.bin is refused "
                         "unless adapter.allow_pickle is true).")
    return acfg


def adapter_file(adapter: str) -> Path:
    """Local path of ``adapter_model.safetensors`` (downloaded or from the HF cache for a hub id)."""
    p = Path(adapter)
    if p.is_dir():
        return p / "adapter_model.safetensors"
    from huggingface_hub import hf_hub_download
    return Path(hf_hub_download(adapter, "adapter_model.safetensors"))


def adapted_modules(adapter: str) -> list[str]:
    """Names of the base modules a LoRA adapter changes (e.g. ``model.layers.0.self_attn.q_proj``),
    read from the tensor names of ``adapter_model.safetensors`` without loading them."""
    from safetensors import safe_open
    with safe_open(adapter_file(adapter), "pt") as h:
        keys = list(h.keys())
    names = {k.split(".lora_A")[0] for k in keys if ".lora_A" in k}
    return sorted(n.removeprefix("base_model.model.") for n in names)


def load_merged_in_memory(model_dir: Path, adapter: str, dtype: torch.dtype):
    """Load ``model_dir`` in float32, apply the adapter, ``merge_and_unload()``, cast to ``dtype``.

    Returns:
        The merged ``transformers`` model (plain modules, no PEFT wrappers), in ``dtype``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter, torch_device="cpu")
    return peft_model.merge_and_unload(progressbar=True).to(dtype)


def check_finite(model, dtype_name: str) -> None:
    """Refuse weights with inf/NaN after the cast, naming the first bad tensor.

    Raises:
        InputError: a weight holds inf or NaN (for float16: suggest bfloat16).
    """
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            hint = " float16 overflows above 65504: set dequantize.dtype to bfloat16." if dtype_name == "float16" else ""
            raise InputError(f"merged weight '{name}' holds inf/NaN after casting to {dtype_name}.{hint}")


def run(cfg) -> Path:
    """Stage entry: merge the adapter into ``<run_dir>/dequantized``; returns ``<run_dir>/merged.unverified``."""
    from transformers import AutoTokenizer
    dequantized, out = cfg.run_dir / "dequantized", cfg.run_dir / "merged.unverified"
    with stage_record(cfg.run_dir, "merge") as rec:
        acfg = read_adapter_config(cfg.adapter.path)
        log(f"merge: adapter '{cfg.adapter.path}' (r={acfg.get('r')}, alpha={acfg.get('lora_alpha')}, "
            f"rslora={acfg.get('use_rslora', False)}, dora={acfg.get('use_dora', False)}) into {dequantized}")
        dtype = DTYPES[cfg.dequantize.dtype]
        merged = load_merged_in_memory(dequantized, cfg.adapter.path, dtype)
        adapted = adapted_modules(cfg.adapter.path)
        check_finite(merged, cfg.dequantize.dtype)
        tok_src = cfg.adapter.path if Path(cfg.adapter.path, "tokenizer_config.json").is_file() else dequantized
        tok = AutoTokenizer.from_pretrained(tok_src)
        with publish_dir(out) as tmp:
            merged.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        rec.update(artefact=str(out), adapted_modules=len(adapted), dtype=cfg.dequantize.dtype,
                   working_dtype="float32", adapter=cfg.adapter.path, tokenizer_from=str(tok_src),
                   lora={k: acfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules")})
    return out
