"""Per-module precision under a quality budget: which quantized modules to keep in 16-bit so that a
GPTQ checkpoint meets a loss target at the smallest size, and a checkpoint that plain
``transformers`` loads with exactly those precisions.

What loads where (transformers 5.24 + optimum 2.3, GPTQModel 7.6; measured in
``tests/test_allocate.py`` and README "Quality per byte"):

* GPTQModel's ``dynamic`` per-module overrides (other bits or group size per module) quantize, but
  plain ``transformers`` ignores ``dynamic``: optimum builds every decoder Linear with the global
  bits and group size, and loading fails on the shape mismatch. Mixed *bit widths* therefore do
  not load in plain ``transformers``.
* optimum's ``modules_in_block_to_quantize`` (kept in the saved ``quantization_config``) is honoured:
  a decoder Linear whose name does not end with a listed name stays an ``nn.Linear``. Full module
  names (``model.layers.3.mlp.down_proj``) make that a per-module choice. So a checkpoint whose
  modules are either GPTQ at the global setting or unquantized 16-bit loads in plain
  ``transformers``; it also carries GPTQModel's ``dynamic`` ``-:`` entries for the same modules,
  which GPTQModel and vLLM read.
* ``lm_head`` / a tied embedding: optimum never quantizes ``lm_head`` (a GPTQModel ``lm_head=True``
  checkpoint reloads with a randomly initialised head), and GPTQModel refuses a tied one.

The mixed checkpoint is written by :func:`splice`: the GPTQ checkpoint with the chosen modules'
packed tensors replaced by their 16-bit weights from the merged checkpoint.

Sensitivity of a module (:func:`eval.sensitivity.module_sensitivity`): the mean KL(merged || merged with only that
module's weight replaced by its GPTQ dequantized weight) on some windows, computed from cached
inputs of its decoder layer. The cheaper alternative is GPTQ's own per-module loss (the Hessian-
weighted output error of each module, on the module's own scale; :func:`gptq_loss_sensitivity`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch


def quantized_names(tensors) -> list[str]:
    return sorted(tensors.quantized, key=_natural)


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def gptq_loss_sensitivity(module_losses: list[dict], prefix: str = "model.layers") -> dict[str, float]:
    """GPTQModel's per-module loss rows (``{"layer", "module", "loss"}``) as ``{full name: loss}``."""
    return {f"{prefix}.{r['layer']}.{r['module']}": float(r["loss"]) for r in module_losses if "loss" in r}


def extra_bytes_fp16(shapes: dict[str, tuple], bits: int, group_size: int, names) -> dict[str, float]:
    """Bytes a module costs more in 16-bit than GPTQ-packed (``bits``, one fp16 scale and a packed
    zero per group, an int32 ``g_idx`` per input): the price of keeping it unquantized."""
    out = {}
    for n in names:
        o, i = shapes[n + ".weight"]
        groups = 1 if group_size == -1 else i // group_size
        packed = o * i * bits / 8 + groups * o * (2 + bits / 8) + 4 * i
        out[n] = 2 * o * i - packed
    return out


def choose_fp16(
    sens: dict[str, float], cost: dict[str, float], total: float, target: float, max_fraction: float = 1.0
) -> tuple[list[str], float]:
    """The modules to keep in 16-bit: the most loss per byte first, until the predicted loss
    ``total - sum(share of the kept)`` is at most ``target``.

    Sensitivities are taken as additive and scaled so that they sum to the measured ``total``
    (KL of the whole quantized model). ``max_fraction`` caps the share of the modules' extra bytes.

    Returns:
        (names in the order chosen, predicted loss).
    """
    s = sum(sens.values())
    scale = total / s if s > 0 else 0.0
    order = sorted(sens, key=lambda n: sens[n] / max(cost[n], 1.0), reverse=True)
    budget = max_fraction * sum(cost[n] for n in sens)
    kept, pred, spent = [], total, 0.0
    for n in order:
        if pred <= target:
            break
        if spent + cost[n] > budget:
            continue
        kept.append(n)
        pred -= scale * sens[n]
        spent += cost[n]
    return kept, max(pred, 0.0)


def splice(
    gptq_dir: Path, merged_dir: Path, keep: list[str], out_dir: Path, max_shard_bytes: int = 5 * 10**9
) -> dict[str, int]:
    """Write ``out_dir``: the GPTQ checkpoint ``gptq_dir`` with the modules ``keep`` unquantized
    (their weight from ``merged_dir``, in the GPTQ checkpoint's float dtype) and a
    ``quantization_config`` that says so: ``modules_in_block_to_quantize`` lists every module
    still quantized by full name (optimum/transformers), ``dynamic`` holds a ``-:`` entry per kept
    module (GPTQModel, vLLM).

    Returns:
        ``{module: bits}`` of every decoder Linear (16 for the kept ones).
    """
    from pipeline.checkpoint import INDEX_FILE, Checkpoint, ShardWriter

    src, merged = Checkpoint(gptq_dir, what="GPTQ checkpoint"), Checkpoint(merged_dir, what="merged checkpoint")
    qc = dict(src.quantization_config or {})
    quantized = {k[: -len(".qweight")] for k in src.tensors if k.endswith(".qweight")}
    missing = sorted(set(keep) - quantized)
    if missing:
        raise ValueError(f"not quantized in {gptq_dir}: {missing}")
    keep_set = set(keep)
    float_dtype = next(  # the checkpoint's own float dtype (GPTQ scales are always float16)
        (t.dtype for k in src.tensors if not k.endswith(".scales") and (t := src.get(k)).is_floating_point()),
        torch.float16,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(gptq_dir).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_FILE:
            shutil.copy(f, out_dir / f.name)
    writer = ShardWriter(out_dir, max_shard_bytes)  # one tensor in memory at a time
    for k in src.tensors:
        mod, _, leaf = k.rpartition(".")
        if mod in keep_set and leaf in ("qweight", "qzeros", "scales", "g_idx"):
            continue
        writer.add(k, src.get(k))
    for m in sorted(keep, key=_natural):
        writer.add(m + ".weight", merged.get(m + ".weight").to(float_dtype))
    writer.finish()
    still = sorted(quantized - keep_set, key=_natural)
    qc["modules_in_block_to_quantize"] = [still]
    dyn = {f"-:^{re.escape(m)}$": {} for m in sorted(keep, key=_natural)}
    qc["dynamic"] = {**dyn, **{k: v for k, v in (qc.get("dynamic") or {}).items() if k not in dyn}}
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["quantization_config"] = qc
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    qfile = out_dir / "quantize_config.json"
    if qfile.is_file():
        qfile.write_text(json.dumps(qc, indent=2) + "\n")
    bits = int(qc.get("bits", 4))
    return {m: (16 if m in keep_set else bits) for m in sorted(quantized, key=_natural)}


def module_bits(path: Path) -> dict[str, int]:
    """``{module: bits}`` of every decoder Linear of a GPTQ checkpoint, from its tensors: a packed
    module's bits from its ``qweight`` rows per input, 16 for a float ``weight`` inside a block."""
    from pipeline.checkpoint import Checkpoint

    ck = Checkpoint(path, what="GPTQ checkpoint")
    shapes = ck.shapes()
    out = {}
    for k, s in shapes.items():
        if k.endswith(".qweight"):
            m = k[: -len(".qweight")]
            out[m] = s[0] * 32 // shapes[m + ".g_idx"][0]
        elif k.endswith(".weight") and len(s) == 2 and ".layers." in k and "norm" not in k:
            out[k[: -len(".weight")]] = 16
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))
