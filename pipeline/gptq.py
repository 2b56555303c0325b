"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) through GPTQModel, the maintained successor of
AutoGPTQ: settings, quantizing a checkpoint, and reloading the result in plain ``transformers``.

The output is a standard GPTQ checkpoint (``quantization_config.quant_method: "gptq"``,
``checkpoint_format: "gptq"``) that ``transformers``, vLLM and TGI load without PEFT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch

from pipeline.errors import InputError, VerificationError


def resolve(rq, setting=None):
    """The ``requantize`` section with a :class:`pipeline.config.GPTQSetting`'s set fields applied."""
    if setting is None:
        return rq.model_copy()
    fields = type(setting).model_fields
    return rq.model_copy(update={k: v for k in fields if (v := getattr(setting, k)) is not None})


def settings_to_check(rq) -> list[tuple[str, object]]:
    """Every GPTQ setting a ``requantize`` section asks for, with its config key: the main one,
    the alternatives and the budget's settings."""
    out = [("requantize", rq)]
    out += [(f"requantize.alternatives[{i}]", resolve(rq, a)) for i, a in enumerate(rq.alternatives)]
    out += [
        (f"requantize.budget.settings[{i}]", resolve(rq, s))
        for i, s in enumerate(rq.budget.settings if rq.budget else [])
    ]
    return out


def tag(rq, base=None) -> str:
    """Folder tag of a setting, e.g. ``4bit-g64-act``, ``4bit-g64-asym-mse2.4``; against the
    ``requantize`` section ``base``, a setting's own damping and calibration set are named too
    (``-damp0.05``, ``-cal-c4``)."""
    extra = "-asym" if not rq.sym else ""
    if not rq.desc_act and rq.act_group_aware is False:
        extra += "-nogar"
    if rq.mse:
        extra += f"-mse{rq.mse:g}"
    if rq.gptaq_alpha:
        extra += f"-gptaq{rq.gptaq_alpha:g}"
    if base is not None and rq.damp_percent != base.damp_percent:
        extra += f"-damp{rq.damp_percent:g}"
    if base is not None and rq.num_samples != base.num_samples:
        extra += f"-n{rq.num_samples}"
    if base is not None and rq.calibration != base.calibration:
        extra += f"-cal-{rq.calibration.name}"
    return f"{rq.bits}bit-g{rq.group_size}{'-act' if rq.desc_act else ''}{extra}"


def bits_per_weight(rq) -> float:
    """Approximate storage per quantized weight (bits): the code plus an fp16 scale and a packed
    zero point per group (GPTQ v1 layout); used to order settings by size."""
    return rq.bits + ((16 + rq.bits) / rq.group_size if rq.group_size > 0 else 0.0)


def linear_in_features(shapes: dict[str, tuple], conv1d_modules: set[str] = frozenset()) -> dict[str, int]:
    """Input width of every 2-D weight inside the decoder layers (what GPTQ quantizes), from
    checkpoint shapes ``{name: shape}``; weights of ``conv1d_modules`` are stored [in, out] (GPT-2)."""
    out = {}
    for k, s in shapes.items():
        mod = k.removesuffix(".weight")
        if k.endswith(".weight") and len(s) == 2 and (".layers." in k or ".h." in k or ".blocks." in k):
            out[k] = s[0] if mod in conv1d_modules else s[1]
    return out


def group_size_problem(widths: dict[str, int], group_size: int) -> str | None:
    """Why ``group_size`` cannot quantize layers of input ``widths`` (None when it can)."""
    if group_size == -1 or not widths:
        return None
    bad = sorted({w for w in widths.values() if w % group_size})
    if not bad:
        return None
    fits = max((g for g in (32, 64, 128) if all(w % g == 0 for w in widths.values())), default=-1)
    return f"group_size {group_size} does not divide layer width(s) {bad}; use a divisor ({fits} fits) or -1."


def _quiet_gptqmodel() -> None:
    from logbar import LogBar

    LogBar.shared().setLevel(logging.WARNING)  # banner and INFO tables
    for name in ("tokenicer", "gptqmodel"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quantize_config(rq, offload: bool, offload_dir: Path | None = None):
    """GPTQModel's ``QuantizeConfig`` for a ``requantize`` setting: bits, group size, act-order
    (``desc_act``) or group-aware reordering (``act_group_aware``, on unless ``desc_act``),
    symmetric, damping (and its automatic increase when the Hessian is not positive definite),
    MSE scale search (``mse``: the norm's exponent, 0 = off), GPTAQ (``gptaq_alpha``), and disk
    offload (GPTQModel keeps one layer in memory) into ``offload_dir`` (the run's scratch folder;
    GPTQModel's default is a temporary folder of its own choosing)."""
    from gptqmodel import QuantizeConfig

    act_group_aware = (not rq.desc_act) if rq.act_group_aware is None else rq.act_group_aware
    kw = {"gptaq": {"alpha": rq.gptaq_alpha}} if rq.gptaq_alpha else {}
    return QuantizeConfig(
        bits=rq.bits,
        group_size=rq.group_size,
        desc_act=rq.desc_act,
        sym=rq.sym,
        damp_percent=rq.damp_percent,
        damp_auto_increment=rq.damp_auto_increment,
        act_group_aware=act_group_aware and not rq.desc_act,
        mse=rq.mse,
        offload_to_disk=offload,
        **({"offload_to_disk_path": str(offload_dir)} if offload and offload_dir is not None else {}),
        **kw,
    )


def quantize(
    merged_dir: Path,
    out_dir: Path,
    rq,
    calib: list[dict],
    device: str,
    log_dir: Path,
    dtype: str = "float16",
    offload: bool = False,
    offload_dir: Path | None = None,
) -> list[dict]:
    """GPTQ-quantize ``merged_dir`` into ``out_dir`` with GPTQModel (``rq``: the requantize section).

    Quantization runs in float32 on CPU (float16 on GPU); the checkpoint is written in ``dtype``
    (float16, or bfloat16 where the merged model is), its ``config.json`` saying so, as GPTQ
    checkpoints are (serving stacks' GPTQ kernels take half precision). GPTQModel writes its
    per-layer log to ``./logs``: the call runs in ``log_dir`` so that it lands in the run folder.
    With ``offload``, layers wait on disk in ``offload_dir`` (created here, removed at the end).

    Returns:
        GPTQModel's per-module log: ``[{"layer", "module", "loss", ...}]``.
    """
    _quiet_gptqmodel()
    merged_dir, out_dir = Path(merged_dir).resolve(), Path(out_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    offload_dir = Path(offload_dir).resolve() if offload and offload_dir is not None else None
    if offload_dir is not None:
        offload_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = _quantize(
            merged_dir, out_dir, quantize_config(rq, offload, offload_dir), calib, device, log_dir, dtype
        )
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
    if offload:
        recast_saved(out_dir, getattr(torch, dtype))
    # GPTQModel rewrites generation_config.json (do_sample=True); keep the model's own.
    for f in ("generation_config.json", "chat_template.jinja"):
        if (Path(merged_dir) / f).is_file():
            shutil.copy(Path(merged_dir) / f, Path(out_dir) / f)
    rows = next((v for k, v in (result or {}).items() if k in ("gptq", "gptaq", "foem") and isinstance(v, list)), [])
    return [
        {
            k: (float(v) if k == "loss" else v)
            for k, v in r.items()
            if k in ("layer", "module", "loss", "samples", "damp", "time")
        }
        for r in rows
    ]


def _quantize(merged_dir: Path, out_dir: Path, qcfg, calib: list[dict], device: str, log_dir: Path, dtype: str):
    """GPTQModel's load, quantize and save, its output silenced, in ``log_dir``; its result dict."""
    from gptqmodel import BACKEND, GPTQModel

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.chdir(log_dir):
        model = GPTQModel.load(
            str(merged_dir), qcfg, device=device, dtype=torch.float32 if device == "cpu" else torch.float16
        )
        result = model.quantize(calib, batch_size=1, backend=BACKEND.AUTO)
        half = getattr(torch, dtype)
        if not qcfg.offload_to_disk:  # offloaded layers are cast after the save (recast_saved)
            model.model.to(half)
        model.model.config.dtype = half
        model.save(str(out_dir))
    return result


def recast_saved(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite the floating tensors of the safetensors files in ``folder`` in ``dtype``, one file
    and one tensor at a time, and set ``config.json``'s ``dtype``: what ``model.to(dtype)`` before
    the save does without offload.

    With ``offload_to_disk``, GPTQModel keeps layers (and the embeddings) on disk as meta
    placeholders and its save copies their stored bytes: ``model.to(dtype)`` beforehand makes the
    save refuse them (``Offload metadata mismatch``), and without it the embeddings stay in the
    float32 GPTQModel loaded them in. Casting afterwards gives the same tensors as the cast before.
    """
    import json

    from pipeline.checkpoint import _ST_DTYPES, ShardWriter, read_tensor

    folder = Path(folder)
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        meta = header.pop("__metadata__", None) or {}
        names = list(header)
        floating = [n for n in names if _ST_DTYPES[header[n]["dtype"]].is_floating_point]
        if all(_ST_DTYPES[header[n]["dtype"]] == dtype for n in floating):
            total += f.stat().st_size
            continue
        tmp = folder / f".recast-{f.name}"
        tmp.mkdir()
        writer = ShardWriter(tmp, max_shard_bytes=1 << 62, metadata=meta)
        cache: dict = {}
        for n in names:
            t = read_tensor(f, n, cache)
            writer.add(n, t.to(dtype) if t.is_floating_point() else t)
            del t
        (written,) = writer.finish()
        written.replace(f)
        tmp.rmdir()
        total += f.stat().st_size
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(doc, indent=2))
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def reload_check(out_dir: Path, calib: list[dict], cfg, device: str, layerwise: bool = False) -> float:
    """Reload the GPTQ checkpoint with plain ``transformers`` and return the mean NLL (nats/token)
    of one calibration row.

    ``layerwise`` (a model too large for memory, ``runtime.offload``) on CPU: ``transformers``
    would hold the whole model densely (its CPU GPTQ kernel unpacks every weight: 11.5 GB for
    two Llama-3-8B layers); instead the checkpoint is checked for a complete GPTQ tensor set per
    quantized linear and run one decoder layer at a time from its own packed tensors
    (:class:`GPTQTensors`, equal to the torch kernel's weights: ``tests/test_gptq.py``).

    Raises:
        VerificationError: it does not load, or gives non-finite logits or loss.
    """
    from pipeline.models import load_causal_lm

    if layerwise and device == "cpu":
        return _reload_check_layerwise(out_dir, calib, cfg)
    try:
        model = load_causal_lm(out_dir, cfg, device=device, dtype=torch.float32 if device == "cpu" else None)
        ids = torch.tensor([calib[0]["input_ids"]], device=model.device)
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
    except Exception as e:  # noqa: BLE001 - any failure to reload means the artefact is unusable
        raise VerificationError(f"GPTQ checkpoint does not reload in transformers: {type(e).__name__}: {e}") from e
    if not (torch.isfinite(out.logits).all() and torch.isfinite(out.loss)):
        raise VerificationError("GPTQ checkpoint reloads but gives non-finite logits")
    return out.loss.item()


def _reload_check_layerwise(out_dir: Path, calib: list[dict], cfg) -> float:
    from pipeline.models import gptq_source

    try:
        tensors = GPTQTensors(out_dir)
        qc = tensors.ckpt.quantization_config or {}
        if qc.get("quant_method") != "gptq" or not tensors.quantized:
            raise ValueError(f"config.json has no GPTQ quantization_config or no packed weights ({qc})")
        for p in sorted(tensors.quantized):
            missing = [s for s in (".qzeros", ".scales", ".g_idx") if p + s not in tensors.ckpt.tensors]
            if missing:
                raise ValueError(f"'{p}' lacks {missing}")
        ids = torch.tensor([calib[0]["input_ids"]])
        logp = next(iter(gptq_source(out_dir, cfg, "cpu", layerwise=True).iter_logprobs(ids)))
    except Exception as e:  # noqa: BLE001 - any failure to reload means the artefact is unusable
        raise VerificationError(f"GPTQ checkpoint does not reload: {type(e).__name__}: {e}") from e
    nll = -logp.gather(1, ids[0, 1:, None]).mean()
    if not (torch.isfinite(logp).all() and torch.isfinite(nll)):
        raise VerificationError("GPTQ checkpoint reloads but gives non-finite logits")
    return nll.item()


def check_group_sizes(settings, widths: dict[str, int], where: str = "requantize") -> None:
    """Refuse any setting whose group size does not divide the quantized layers' widths.

    Raises:
        InputError: naming the setting and the widths, e.g. 128 on SmolLM2 (hidden 576).
    """
    for key, s in settings:
        if problem := group_size_problem(widths, s.group_size):
            raise InputError(f"{key}.{problem}")


# --- reading a GPTQ checkpoint back as floats -------------------------------------------------------
# GPTQ v1 layout (AutoGPTQ/GPTQModel "gptq" format), per quantized Linear <p> with `in` inputs, `out`
# outputs, b bits, G groups: <p>.qweight int32 [in*b/32, out] (codes along the input dim, LSB first),
# <p>.qzeros int32 [G, out*b/32] (zero - 1 in v1), <p>.scales fp16 [G, out], <p>.g_idx int32 [in].
# W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]), computed in the scales' dtype (fp16) as
# GPTQModel's torch kernel (TorchLinear) does; tests/test_gptq.py shows the float model equal to it.

_MASK32 = (1 << 32) - 1


def unpack_codes(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """``bits``-bit codes packed LSB-first in int32 words along ``dim`` (0: rows, as ``qweight``;
    1: columns, as ``qzeros``), unpacked to int64 with ``n`` entries along that dim (3-bit codes
    straddle words: 32 codes per 3 words)."""
    w = (packed if dim == 0 else packed.t()).to(torch.int64) & _MASK32
    blocks = w.view(w.shape[0] // bits, bits, -1)
    mask = (1 << bits) - 1
    codes = []
    for k in range(32):
        off = k * bits
        wi, sh = off // 32, off % 32
        v = blocks[:, wi] >> sh
        if sh + bits > 32:
            v = v | (blocks[:, wi + 1] << (32 - sh))
        codes.append(v & mask)
    out = torch.stack(codes, dim=1).reshape(-1, w.shape[1])[:n]
    return out if dim == 0 else out.t()


def dequantize_linear(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """The float weight ``[out, in]`` (float32) of one GPTQ Linear, as GPTQModel's torch kernel computes it
    (v1 zeros stored as zero - 1; the product rounded to the scales' dtype)."""
    in_features, out_features = g_idx.numel(), scales.shape[1]
    z = unpack_codes(qzeros, bits, out_features, dim=1)
    if checkpoint_format == "gptq":
        z = (z + 1) & ((1 << bits) - 1)  # v1 -> v2, as the kernels convert on load (per field, wrapping)
    q = unpack_codes(qweight, bits, in_features, dim=0)
    g = g_idx.long()
    w = scales.float()[g] * (q - z[g]).float()  # exact in float32: |q - z| <= 2^bits
    return w.to(scales.dtype).t().contiguous().float()


class GPTQTensors:
    """A GPTQ checkpoint's parameters as floats, one at a time (``get(name, dtype=float32)``): a quantized
    ``<p>.weight`` is dequantized from ``qweight``/``qzeros``/``scales``/``g_idx``; the rest is read as stored."""

    def __init__(self, path):
        from pipeline.checkpoint import Checkpoint

        self.ckpt = Checkpoint(path, what="GPTQ checkpoint")
        qc = self.ckpt.quantization_config or {}
        self.format = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        self.quantized = {k[: -len(".qweight")] for k in self.ckpt.tensors if k.endswith(".qweight")}

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        p = name.removesuffix(".weight")
        if name.endswith(".weight") and p in self.quantized:
            g_idx = self.ckpt.get(p + ".g_idx")
            qweight = self.ckpt.get(p + ".qweight")
            bits = qweight.shape[0] * 32 // g_idx.numel()
            return dequantize_linear(
                qweight, self.ckpt.get(p + ".qzeros"), self.ckpt.get(p + ".scales"), g_idx, bits, self.format
            ).to(dtype)
        return self.ckpt.get(name, dtype=torch.float32).to(dtype)

    def config(self):
        """The checkpoint's config without its ``quantization_config`` (a plain float model's)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.ckpt.folder)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        return config
