"""Stage 4, requantize: GPTQ (Frantar et al. 2022, arXiv:2210.17323) of the verified merged
checkpoint with GPTQModel, the maintained successor of AutoGPTQ, into a standard GPTQ
checkpoint (``quantization_config.quant_method: "gptq"``, ``checkpoint_format: "gptq"``)
that ``transformers``, vLLM and TGI load without PEFT.

Calibration: ``num_samples`` windows of ``seq_len`` tokens taken at evenly spaced offsets
from the calibration corpus (C4 is the standard GPTQ source; the embedded default is
the pydoc train topics). The checkpoint is reloaded with plain ``transformers`` and must
give finite logits before it is published as ``<run_dir>/gptq``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from pipeline.common import log, pick_device, publish_dir, stage_record, token_stream
from pipeline.errors import InputError, VerificationError

import torch  # noqa: E402


def calibration_windows(tokenizer, src, num_samples: int, seq_len: int) -> list[dict]:
    """``num_samples`` calibration rows ``{"input_ids", "attention_mask"}`` (lists of ``seq_len`` ints).

    Raises:
        InputError: the corpus holds fewer than ``seq_len`` tokens.
    """
    ids = token_stream(tokenizer, src, max_tokens=min(src.max_tokens, num_samples * seq_len * 4))
    if len(ids) < seq_len:
        raise InputError(f"calibration set '{src.name}' has {len(ids)} tokens, fewer than seq_len={seq_len}.")
    n_start = len(ids) - seq_len + 1
    starts = sorted({round(i * (n_start - 1) / max(1, num_samples - 1)) for i in range(num_samples)})
    return [{"input_ids": ids[s:s + seq_len].tolist(), "attention_mask": [1] * seq_len} for s in starts]


def check_group_size(model_dir: Path, group_size: int) -> None:
    """Refuse a group size that does not divide every quantized layer's input width.

    Raises:
        InputError: e.g. 128 on SmolLM2 (hidden 576): GPTQModel's CPU kernels refuse to load it.
    """
    import json
    if group_size == -1:
        return
    c = json.loads((Path(model_dir) / "config.json").read_text())
    widths = {c.get("hidden_size"), c.get("intermediate_size")} - {None}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise InputError(f"requantize.group_size {group_size} does not divide layer width(s) {bad}; "
                         f"use a divisor (e.g. {max(g for g in (32, 64, 128) if all(w % g == 0 for w in widths))}) "
                         "or -1.")


def _quiet_gptqmodel():
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
    qcfg = QuantizeConfig(bits=rq.bits, group_size=rq.group_size, desc_act=rq.desc_act, sym=rq.sym,
                          damp_percent=rq.damp_percent,
                          act_group_aware=not rq.desc_act,  # GPTQModel turns it off under desc_act anyway
                          offload_to_disk=False)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.chdir(log_dir):
        model = GPTQModel.load(str(merged_dir), qcfg, device=device,
                               dtype=torch.float32 if device == "cpu" else torch.float16)
        model.quantize(calib, batch_size=1, backend=BACKEND.AUTO)
        model.save(str(out_dir))
    # GPTQModel rewrites generation_config.json (do_sample=True); keep the model's own.
    for f in ("generation_config.json", "chat_template.jinja"):
        if (Path(merged_dir) / f).is_file():
            shutil.copy(Path(merged_dir) / f, Path(out_dir) / f)


def reload_check(out_dir: Path, calib: list[dict]) -> float:
    """Reload the GPTQ checkpoint with plain ``transformers`` and return the mean NLL (nats/token)
    of one calibration row.

    Raises:
        VerificationError: it does not load, or gives non-finite logits.
    """
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(out_dir, device_map={"": pick_device("auto")}).eval()
        ids = torch.tensor([calib[0]["input_ids"]], device=model.device)
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
    except Exception as e:  # noqa: BLE001 - any failure to reload means the artefact is unusable
        raise VerificationError(f"GPTQ checkpoint does not reload in transformers: {type(e).__name__}: {e}") from e
    if not torch.isfinite(out.logits).all():
        raise VerificationError("GPTQ checkpoint reloads but gives non-finite logits")
    return out.loss.item()


def run(cfg) -> Path | None:
    """Stage entry: GPTQ of ``<run_dir>/merged`` into ``<run_dir>/gptq``; None when disabled."""
    from transformers import AutoTokenizer
    rq = cfg.requantize
    merged, out = cfg.run_dir / "merged", cfg.run_dir / "gptq"
    with stage_record(cfg.run_dir, "requantize") as rec:
        if not rq.enabled:
            rec.update(status="skipped")
            return None
        if not merged.is_dir():
            raise InputError(f"{merged} is missing: run the merge and verify stages first.")
        check_group_size(merged, rq.group_size)
        tok = AutoTokenizer.from_pretrained(merged)
        calib = calibration_windows(tok, rq.calibration, rq.num_samples, rq.seq_len)
        device = pick_device(cfg.dequantize.device)
        log(f"requantize: GPTQ {rq.bits}-bit, group size {rq.group_size}, desc_act {rq.desc_act}, "
            f"{len(calib)} x {rq.seq_len} calibration tokens from '{rq.calibration.name}' on {device}")
        with publish_dir(out) as tmp:
            quantize(merged, tmp, rq, calib, device, log_dir=cfg.run_dir / "stages" / "requantize")
            nll = reload_check(tmp, calib)
        log(f"requantize: reloaded in transformers, calibration NLL {nll:.3f}")
        rec.update(artefact=str(out), bits=rq.bits, group_size=rq.group_size, desc_act=rq.desc_act, sym=rq.sym,
                   damp_percent=rq.damp_percent, calibration=rq.calibration.name, calibration_rows=len(calib),
                   calibration_tokens=len(calib) * rq.seq_len, reload_calibration_nll=nll, engine="gptqmodel")
    return out
