"""Stage 1, dequantize: the 4-bit base back to full precision, exactly as the adapter saw it
during QLoRA training (``dequantize_4bit(W_4bit, quant_state)`` per quantized linear), written
to ``dequantized/`` in the output dtype. Refuses an unmergeable adapter/base pair first.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import bnb4
from pipeline.adapter_checks import check_adapter
from pipeline.common import DTYPES, log, publish_dir
from pipeline.errors import InputError
from pipeline.models import apply_runtime, load_4bit_base, load_tokenizer
from pipeline.records import stage_record


def run(cfg) -> Path | None:
    """Stage entry: load the 4-bit base, dequantize it, save ``dequantized/`` (when ``dequantize.save``).

    Returns:
        Path of the dequantized checkpoint (safetensors, ``cfg.out_dtype``), or None when not saved.
    Raises:
        InputError: an unmergeable adapter/base pair (:func:`check_adapter`), or a base with no
            linear layer bitsandbytes can quantize.
    """
    layout = cfg.layout
    out = layout.dequantized
    with stage_record(layout, "dequantize") as rec:
        check_adapter(cfg)  # refuse an unmergeable pair before hours of work
        device = apply_runtime(cfg.runtime)
        log(f"dequantize: loading base '{cfg.base.path}' in 4-bit on {device}")
        model = load_4bit_base(cfg, device)
        n4 = bnb4.count_linear4bit(model)
        if n4 == 0:
            raise InputError(f"base '{cfg.base.path}' has no linear layer bitsandbytes can quantize.")
        rec.update(
            linear4bit_layers=n4,
            device=device,
            dtype=cfg.out_dtype,
            quant_type=cfg.dequantize.quant_type,
            double_quant=cfg.dequantize.double_quant,
            compute_dtype=cfg.dequantize.compute_dtype,
        )
        if not cfg.dequantize.save:
            rec.update(artefact=None)
            return None
        log(f"dequantize: {n4} Linear4bit layers -> nn.Linear {cfg.out_dtype}")
        model = bnb4.dequantize_model(model, DTYPES[cfg.out_dtype]).to("cpu")
        tok = load_tokenizer(cfg.base.path, cfg)
        with publish_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        rec.update(artefact=str(out))
    return out
