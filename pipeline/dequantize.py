"""Stage 1, dequantize: the 4-bit base back to full precision, exactly as the adapter saw it during
QLoRA training, one tensor at a time (:class:`pipeline.bnb4.BaseTensors`), written to
``dequantized/`` in the output dtype. Refuses an unmergeable adapter/base pair first.

The merge stage streams the same reconstruction itself (in float32, cast once), so
``dequantized/`` is an artefact for people and for the evaluation's ``base`` variant
(``dequantize.save: false`` skips writing it).
"""

from __future__ import annotations

from pathlib import Path

from pipeline import fingerprint
from pipeline.adapter_checks import check_adapter
from pipeline.bnb4 import BaseTensors
from pipeline.checkpoint import Checkpoint, ShardWriter
from pipeline.common import DTYPES, all_finite, log, publish_dir
from pipeline.errors import InputError
from pipeline.models import apply_runtime, load_tokenizer
from pipeline.records import stage_record


def run(cfg) -> Path | None:
    """Stage entry: rebuild every 4-bit weight as training saw it and save ``dequantized/`` (when
    ``dequantize.save``).

    Returns:
        Path of the dequantized checkpoint (safetensors shards, ``cfg.out_dtype``), or None when not saved.
    Raises:
        InputError: an unmergeable adapter/base pair (:func:`check_adapter`), a base with no linear
            layer bitsandbytes quantizes, inf/NaN after the cast to the output dtype.
    """
    from transformers import AutoConfig
    from tqdm import tqdm

    layout = cfg.layout
    out = layout.dequantized
    with stage_record(layout, "dequantize", fingerprint.inputs(cfg, "dequantize")) as rec:
        check_adapter(cfg)  # refuse an unmergeable pair before hours of work
        device = apply_runtime(cfg.runtime)
        base = Checkpoint(cfg.base.path)
        tensors = BaseTensors(base, cfg, source="dequantized", device=device)
        quantized = [t for t in tensors.targets if tensors.quantized(t)]
        if not quantized:
            raise InputError(f"base '{cfg.base.path}' has no linear layer bitsandbytes quantizes.")
        rec.update(
            linear4bit_layers=len(quantized),
            device=device,
            dtype=cfg.out_dtype,
            quant_type=cfg.dequantize.quant_type,
            double_quant=cfg.dequantize.double_quant,
            compute_dtype=cfg.dequantize.compute_dtype,
            load_dtype=str(tensors.load_dtype).removeprefix("torch."),
        )
        if not cfg.dequantize.save:
            rec.update(artefact=None)
            return None
        log(
            f"dequantize: {len(quantized)} 4-bit weights of '{base.folder}' on {device} -> {cfg.out_dtype}, one at a time"
        )
        dtype = DTYPES[cfg.out_dtype]
        with publish_dir(out) as tmp:
            writer = ShardWriter(tmp, int(cfg.runtime.shard_size_gb * 1e9))
            for name in tqdm(tensors.targets, desc="dequantize", unit="tensor", leave=False):
                t = tensors.get(name, dtype)
                if not all_finite(t):
                    raise InputError(
                        f"dequantized weight '{name}' holds inf/NaN in {cfg.out_dtype}; set "
                        "dequantize.dtype: bfloat16 (float16 overflows above 65504)."
                    )
                for key, piece in tensors.checkpoint_pieces(name, t):
                    writer.add(key, piece.cpu())
            writer.finish()
            config = AutoConfig.from_pretrained(base.folder, trust_remote_code=cfg.base.trust_remote_code)
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            config.dtype = cfg.out_dtype
            config.save_pretrained(tmp)
            load_tokenizer(base.folder, cfg).save_pretrained(tmp)
            if (base.folder / "generation_config.json").is_file():
                (tmp / "generation_config.json").write_bytes((base.folder / "generation_config.json").read_bytes())
        rec.update(artefact=str(out), bytes=writer.total_bytes)
    return out
