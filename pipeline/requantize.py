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

from pipeline.common import log, pick_device, publish_dir, stage_record, text_windows, token_stream
from pipeline.errors import InputError, VerificationError

import torch  # noqa: E402


def calibration_windows(tokenizer, src, num_samples: int, seq_len: int) -> list[dict]:
    """``num_samples`` calibration rows ``{"input_ids", "attention_mask"}`` (lists of ``seq_len`` ints).

    Raises:
        InputError: the corpus holds fewer than ``seq_len`` tokens.
    """
    ids = token_stream(tokenizer, src, max_tokens=min(src.max_tokens, num_samples * seq_len * 4))
    if len(ids) < num_samples * seq_len:
        raise InputError(f"calibration set '{src.name}' has {len(ids)} tokens, fewer than requantize.num_samples x "
                         f"seq_len = {num_samples} x {seq_len}; lower them (at most {len(ids) // seq_len} samples of "
                         f"{seq_len}) or give more calibration text.")
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
                         f"use a divisor ({max((g for g in (32, 64, 128) if all(w % g == 0 for w in widths)), default=-1)}"
                         " fits) or -1.")


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


def resolve(rq, setting=None):
    """The requantize section with a :class:`GPTQSetting`'s fields applied."""
    return rq.model_copy(update={k: v for k, v in (setting.model_dump() if setting else {}).items() if v is not None})


def tag(rq) -> str:
    """Folder tag of a setting, e.g. ``4bit-g64-act``."""
    return f"{rq.bits}bit-g{rq.group_size}{'-act' if rq.desc_act else ''}{'' if rq.sym else '-asym'}"


def bits_per_weight(rq) -> float:
    """Approximate storage per quantized weight (bits): the code plus an fp16 scale and a packed
    zero point per group (GPTQ v1 layout); used to order budget settings by size."""
    return rq.bits + ((16 + rq.bits) / rq.group_size if rq.group_size > 0 else 0.0)


def build(cfg, rq, out: Path, calib: list[dict], device: str) -> dict:
    """Quantize ``<run_dir>/merged`` with setting ``rq`` into ``out`` (atomic), reload-check it.

    Returns:
        the setting's record: bits, group_size, desc_act, sym, bits_per_weight, reload NLL, seconds.
    """
    import time
    merged = cfg.run_dir / "merged"
    check_group_size(merged, rq.group_size)
    t0 = time.perf_counter()
    log(f"requantize: GPTQ {tag(rq)} ({len(calib)} x {rq.seq_len} calibration tokens from "
        f"'{rq.calibration.name}', {device}) -> {out}")
    with publish_dir(out) as tmp:
        quantize(merged, tmp, rq, calib, device, log_dir=cfg.run_dir / "stages" / "requantize" / tag(rq))
        nll = reload_check(tmp, calib)
    return {"artefact": str(out), "bits": rq.bits, "group_size": rq.group_size, "desc_act": rq.desc_act,
            "sym": rq.sym, "bits_per_weight": round(bits_per_weight(rq), 3), "reload_calibration_nll": nll,
            "seconds": round(time.perf_counter() - t0, 1)}


def within_budget(cfg, candidate: Path, store, wins, ref_ppl: float) -> dict:
    """Score a GPTQ checkpoint against the reference on the verify windows; apply the budget."""
    from transformers import AutoModelForCausalLM
    from eval.metrics import score
    b = cfg.requantize.budget
    model = AutoModelForCausalLM.from_pretrained(candidate, device_map={"": pick_device("auto")}).eval()
    s = score(model, wins, ref=store)
    inc = s["perplexity"] / ref_ppl - 1
    ok = (b.max_perplexity_increase is None or inc <= b.max_perplexity_increase) and \
         (b.max_kl is None or s["kl_divergence"] <= b.max_kl)
    return {"perplexity": s["perplexity"], "perplexity_increase": inc, "kl_divergence": s["kl_divergence"],
            "top1_agreement": s["top1_agreement"], "within_budget": ok}


def _budget(cfg, calib, device, rec) -> Path:
    """Try the budget's settings from the smallest checkpoint up; publish the first within budget as ``gptq``."""
    import shutil
    from eval.metrics import ReferenceStore, score
    from pipeline.verify import reference_model
    from transformers import AutoTokenizer
    rq, rd, b = cfg.requantize, cfg.run_dir, cfg.requantize.budget
    settings = sorted((resolve(rq, s) for s in b.settings), key=bits_per_weight)
    wins = text_windows(AutoTokenizer.from_pretrained(rd / "merged"), cfg.verify.data, cfg.verify.seq_len, "verify.data")
    ref = reference_model(cfg)
    store = ReferenceStore(len(wins), cfg.verify.seq_len, ref.get_output_embeddings().weight.shape[0], folder=rd)
    tried, chosen = [], None
    try:
        ref_ppl = score(ref, wins, store=store)["perplexity"]
        del ref
        for s in settings:
            out = rd / f"gptq-{tag(s)}"
            r = build(cfg, s, out, calib, device)
            r.update(within_budget(cfg, out, store, wins, ref_ppl))
            log(f"requantize: budget: {tag(s)} perplexity {r['perplexity_increase']:+.2%}, KL {r['kl_divergence']:.4g}"
                f" -> {'kept' if r['within_budget'] else 'rejected'}")
            tried.append(r)
            if r["within_budget"]:
                chosen = s
                shutil.rmtree(rd / "gptq", ignore_errors=True)
                out.rename(rd / "gptq")
                r["artefact"] = str(rd / "gptq")
                break
            shutil.rmtree(out)  # a rejected checkpoint is not kept
            r["artefact"] = None
    finally:
        store.close()
    rec["budget"] = {"max_perplexity_increase": b.max_perplexity_increase, "max_kl": b.max_kl,
                     "reference_perplexity": ref_ppl, "data": cfg.verify.data.name, "tried": tried,
                     "chosen": tag(chosen) if chosen else None}
    if chosen is None:
        raise VerificationError("no GPTQ setting is within the quality budget; tried: "
                                + ", ".join(f"{t['bits']}bit-g{t['group_size']} ({t['perplexity_increase']:+.2%}, "
                                            f"KL {t['kl_divergence']:.3g})" for t in tried))
    return rd / "gptq"


def run(cfg) -> Path | None:
    """Stage entry: GPTQ of ``<run_dir>/merged`` into ``<run_dir>/gptq`` (with ``budget``: the
    smallest setting within budget), plus ``gptq-<tag>`` for each of ``alternatives``.
    None when disabled.
    """
    from transformers import AutoTokenizer
    rq = cfg.requantize
    merged = cfg.run_dir / "merged"
    with stage_record(cfg.run_dir, "requantize") as rec:
        if not rq.enabled:
            rec.update(status="skipped")
            return None
        if not merged.is_dir():
            raise InputError(f"{merged} is missing: run the merge and verify stages first.")
        for s in [rq, *(resolve(rq, a) for a in rq.alternatives), *(resolve(rq, a) for a in (rq.budget.settings if rq.budget else []))]:
            check_group_size(merged, s.group_size)  # refuse before any work
        calib = calibration_windows(AutoTokenizer.from_pretrained(merged), rq.calibration, rq.num_samples, rq.seq_len)
        device = pick_device(cfg.dequantize.device)
        if rq.budget:
            out = _budget(cfg, calib, device, rec)
            main = next(t for t in rec["budget"]["tried"] if t["within_budget"])
        else:
            out = cfg.run_dir / "gptq"
            main = build(cfg, rq, out, calib, device)
        rec.update(main)
        rec["alternatives"] = [build(cfg, s, cfg.run_dir / f"gptq-{tag(s)}", calib, device)
                               for s in (resolve(rq, a) for a in rq.alternatives)]
        rec.update(damp_percent=rq.damp_percent, calibration=rq.calibration.name, calibration_rows=len(calib),
                   calibration_tokens=len(calib) * rq.seq_len, engine="gptqmodel")
    return out
