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
    return rq.model_copy(update={k: v for k, v in (setting.model_dump() if setting else {}).items() if v is not None})


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


def tag(rq) -> str:
    """Folder tag of a setting, e.g. ``4bit-g64-act``."""
    return f"{rq.bits}bit-g{rq.group_size}{'-act' if rq.desc_act else ''}{'' if rq.sym else '-asym'}"


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


def quantize(merged_dir: Path, out_dir: Path, rq, calib: list[dict], device: str, log_dir: Path) -> None:
    """GPTQ-quantize ``merged_dir`` into ``out_dir`` with GPTQModel (``rq``: the requantize section).

    GPTQModel writes its per-layer quantization log (loss per module) to ``./logs``: the
    call runs in ``log_dir`` so that it lands in the run folder, not the user's directory.
    """
    _quiet_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    merged_dir, out_dir = Path(merged_dir).resolve(), Path(out_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    qcfg = QuantizeConfig(
        bits=rq.bits,
        group_size=rq.group_size,
        desc_act=rq.desc_act,
        sym=rq.sym,
        damp_percent=rq.damp_percent,
        act_group_aware=not rq.desc_act,  # GPTQModel turns it off under desc_act anyway
        offload_to_disk=False,
    )
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.chdir(log_dir):
        model = GPTQModel.load(
            str(merged_dir), qcfg, device=device, dtype=torch.float32 if device == "cpu" else torch.float16
        )
        model.quantize(calib, batch_size=1, backend=BACKEND.AUTO)
        model.save(str(out_dir))
    # GPTQModel rewrites generation_config.json (do_sample=True); keep the model's own.
    for f in ("generation_config.json", "chat_template.jinja"):
        if (Path(merged_dir) / f).is_file():
            shutil.copy(Path(merged_dir) / f, Path(out_dir) / f)


def reload_check(out_dir: Path, calib: list[dict], cfg, device: str) -> float:
    """Reload the GPTQ checkpoint with plain ``transformers`` and return the mean NLL (nats/token)
    of one calibration row.

    Raises:
        VerificationError: it does not load, or gives non-finite logits or loss.
    """
    from pipeline.models import load_causal_lm

    try:
        model = load_causal_lm(out_dir, cfg, device=device)
        ids = torch.tensor([calib[0]["input_ids"]], device=model.device)
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
    except Exception as e:  # noqa: BLE001 - any failure to reload means the artefact is unusable
        raise VerificationError(f"GPTQ checkpoint does not reload in transformers: {type(e).__name__}: {e}") from e
    if not (torch.isfinite(out.logits).all() and torch.isfinite(out.loss)):
        raise VerificationError("GPTQ checkpoint reloads but gives non-finite logits")
    return out.loss.item()


def check_group_sizes(settings, widths: dict[str, int], where: str = "requantize") -> None:
    """Refuse any setting whose group size does not divide the quantized layers' widths.

    Raises:
        InputError: naming the setting and the widths, e.g. 128 on SmolLM2 (hidden 576).
    """
    for key, s in settings:
        if problem := group_size_problem(widths, s.group_size):
            raise InputError(f"{key}.{problem}")
