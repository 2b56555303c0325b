"""Stage 4, requantize: GPTQ of the verified merged checkpoint with GPTQModel (``pipeline.gptq``)
into a standard GPTQ checkpoint.

Calibration: ``num_samples`` windows of ``seq_len`` tokens taken at evenly spaced offsets
from the calibration corpus (C4 is the standard GPTQ source; the embedded default is the
pydoc train topics). Each checkpoint is reloaded with plain ``transformers`` and must give
finite logits before it is published as ``gptq/`` (or ``gptq-<tag>/``). With a quality
budget, settings are tried from the smallest checkpoint up against the reference on the
verify text, and the first within budget becomes ``gptq/``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from eval.metrics import ReferenceCache, score
from eval.sensitivity import module_sensitivity
from pipeline import fingerprint, gptq
from pipeline.checkpoint import Checkpoint
from pipeline.common import dir_size_bytes, log, publish_dir, within
from pipeline.errors import InputError, VerificationError
from pipeline.models import apply_runtime, gptq_source, layerwise_wanted, load_tokenizer, reference_model
from pipeline.records import BudgetTry, GPTQBuild, stage_record
from pipeline.textdata import calibration_set, text_windows


def describe_calibration(comp: dict) -> str:
    """One line: '<name>: <tokens> tokens in <windows> windows of <= <seq_len> (<share> <part> ...)'."""
    parts = ", ".join(
        f"{100 * p['token_share']:.0f}% {p['name']}" + (f" ({p['template']} template)" if p.get("template") else "")
        for p in comp["parts"]
    )
    return f"'{comp['name']}': {comp['tokens']} tokens in {comp['windows']} windows of <= {comp['seq_len']} ({parts})"


def build(cfg, rq, out: Path, calib, device: str, offload: bool = False) -> GPTQBuild:
    """Quantize ``merged/`` with setting ``rq`` into ``out`` (atomic), reload-check it.

    ``calib``: the calibration rows and their composition (:func:`pipeline.textdata.calibration_set`)."""
    calib, composition = calib
    layout = cfg.layout
    t0 = time.perf_counter()
    half = cfg.out_dtype if cfg.out_dtype in ("float16", "bfloat16") else "float16"
    log(
        f"requantize: GPTQ {gptq.tag(rq, cfg.requantize)} ({sum(len(r['input_ids']) for r in calib)} calibration tokens in {len(calib)} rows from "
        f"'{rq.calibration.name}', {device}) -> {out}"
    )
    with publish_dir(out) as tmp:
        losses = gptq.quantize(
            layout.merged,
            tmp,
            rq,
            calib,
            device,
            log_dir=layout.stage_logs("requantize") / gptq.tag(rq, cfg.requantize),
            dtype=half,
            offload=offload,
            offload_dir=layout.scratch / "gptq-offload",
        )
        nll = gptq.reload_check(tmp, calib, cfg, device, layerwise=offload)
    return {
        "artefact": str(out),
        "tag": gptq.tag(rq, cfg.requantize),
        "calibration": rq.calibration.name,
        "calibration_tokens": composition["tokens"],
        "bits": rq.bits,
        "group_size": rq.group_size,
        "desc_act": rq.desc_act,
        "act_group_aware": (not rq.desc_act) if rq.act_group_aware is None else rq.act_group_aware,
        "sym": rq.sym,
        "mse": rq.mse,
        "damp_percent": rq.damp_percent,
        "gptaq_alpha": rq.gptaq_alpha,
        "dtype": half,
        "bits_per_weight": round(gptq.bits_per_weight(rq), 3),
        "reload_calibration_nll": nll,
        "size_bytes": dir_size_bytes(out),
        "seconds": round(time.perf_counter() - t0, 1),
        "module_losses": losses,
    }


def within_budget(cfg, candidate: Path, ref, wins, device: str) -> dict:
    """Score a GPTQ checkpoint against the reference (in lockstep) on the verify windows; apply the
    budget (fails closed: a NaN loss is never within budget)."""
    b = cfg.requantize.budget
    s = score(gptq_source(candidate, cfg, device), wins, ref=ref)
    ref_ppl = float(np.exp(s["ref_nll_per_window"].sum() / s["tokens"]))
    inc = s["perplexity"] / ref_ppl - 1
    ok = (
        (b.max_perplexity_increase is None or within(inc, b.max_perplexity_increase))
        and (b.max_kl is None or within(s["kl_divergence"], b.max_kl))
        and not s.get("nonfinite")
    )
    return {
        "perplexity": s["perplexity"],
        "perplexity_increase": inc,
        "kl_divergence": s["kl_divergence"],
        "top1_agreement": s["top1_agreement"],
        "reference_perplexity": ref_ppl,
        "within_budget": ok,
    }


def _floor(cfg, ref_ppl: float) -> tuple[float, float]:
    """(KL, perplexity increase) of the merged checkpoint itself against the reference on the verify
    text (the verify record's): the part of a GPTQ checkpoint's loss that no precision removes."""
    from pipeline.records import read_record

    ver = read_record(cfg.layout, "verify") or {}
    cand = (ver.get("candidates") or {}).get(ver.get("merge_base") or "", {})
    kl = cand.get("kl_divergence", ver.get("kl_divergence")) or 0.0
    ppl = cand.get("perplexity")
    return float(kl), (ppl / ref_ppl - 1) if ppl else 0.0


def _allocate(cfg, s, src: Path, uniform: BudgetTry, ref, wins, device: str, rows: list[dict]) -> list[BudgetTry]:
    """Per-module precision for setting ``s`` (checkpoint ``src``, over budget as ``uniform``): keep
    the modules with the most loss per byte in 16-bit (:func:`pipeline.allocate.choose_fp16`) until
    the predicted loss is within budget; write the mixed checkpoint (:func:`pipeline.allocate.splice`),
    measure it, and correct the target from the measurement, up to ``allocate.tries`` times.

    Returns every mixed try (the last one within budget, if any; those over budget are deleted
    unless ``keep_tries``)."""
    import torch

    from pipeline import allocate
    from pipeline.models import load_causal_lm

    layout, b = cfg.layout, cfg.requantize.budget
    a = b.allocate
    tensors = gptq.GPTQTensors(src)
    names = sorted(tensors.quantized, key=allocate._natural)
    t0 = time.perf_counter()
    if a.sensitivity == "kl":
        model = load_causal_lm(layout.merged, cfg, device=device, dtype=torch.float32)
        # calibration text, not the verify text the budget is measured on
        probe = [torch.tensor(r["input_ids"][: a.probe_tokens]) for r in rows[: a.windows]]
        sens = module_sensitivity(
            model, tensors, probe, names, progress=f"requantize: sensitivity of {len(names)} modules"
        )
        del model
    else:
        sens = allocate.gptq_loss_sensitivity(uniform.get("module_losses") or [])
        sens = {n: sens.get(n, 0.0) for n in names}
    sens_seconds = round(time.perf_counter() - t0, 1)
    cost = allocate.extra_bytes_fp16(Checkpoint(layout.merged).shapes(), s.bits, s.group_size, names)
    floor_kl, floor_inc = _floor(cfg, uniform["reference_perplexity"])

    limits = [(b.max_kl, "kl_divergence", floor_kl), (b.max_perplexity_increase, "perplexity_increase", floor_inc)]
    limits = [x for x in limits if x[0] is not None]

    def required(u) -> list[float]:
        """Per budget limit: the share of the uniform checkpoint's quantization loss that may remain."""
        return [(lim - floor) / max(u[key] - floor, 1e-12) for lim, key, floor in limits]

    def fractions(t, u) -> list[float]:
        """Per budget limit: the share of the uniform checkpoint's quantization loss that ``t`` keeps."""
        return [(t[key] - floor) / max(u[key] - floor, 1e-12) for _, key, floor in limits]

    target = max(0.0, min(required(uniform) + [1.0]))
    tries: list[BudgetTry] = []
    last_keep = None
    for _ in range(a.tries):
        keep, predicted = allocate.choose_fp16(sens, cost, 1.0, target, a.max_fp16_fraction)
        if not keep or keep == last_keep:
            break
        last_keep = keep
        tag = f"{gptq.tag(s, cfg.requantize)}-keep{len(keep)}"
        out = layout.gptq_alternative(tag)
        t1 = time.perf_counter()
        with publish_dir(out) as tmp:
            bits = allocate.splice(src, layout.merged, keep, tmp, int(cfg.runtime.shard_size_gb * 1e9))
            nll = gptq.reload_check(tmp, [{"input_ids": wins[0].tolist()}], cfg, device)
        r: BudgetTry = {
            **{
                k: v
                for k, v in uniform.items()
                if k not in ("module_losses", "artefact", "within_budget", "reload_calibration_nll")
            },
            "artefact": str(out),
            "tag": tag,
            "fp16_modules": keep,
            "module_bits": bits,
            "reload_verify_nll": nll,
            "sensitivity": a.sensitivity,
            "sensitivity_seconds": sens_seconds,
            "sensitivities": {n: sens[n] for n in keep},
            "predicted_remaining_share": round(predicted, 4),
            "bits_per_weight": round(_effective_bits(cost, s, keep, Checkpoint(layout.merged).shapes()), 3),
            "size_bytes": dir_size_bytes(out),
            "seconds": round(time.perf_counter() - t1, 1),
            **within_budget(cfg, out, ref, wins, device),
        }
        log(
            f"requantize: budget: {tag} ({len(keep)} modules 16-bit, {r['size_bytes'] / 2**20:.1f} MiB) perplexity "
            f"{r['perplexity_increase']:+.2%}, KL {r['kl_divergence']:.4g} -> "
            f"{'within budget' if r['within_budget'] else 'over budget'}"
        )
        tries.append(r)
        if r["within_budget"]:
            break
        if not b.keep_tries:
            shutil.rmtree(out)
            r["artefact"] = None
        # the allocation left more loss than predicted: ask for proportionally less, per the worst metric
        factor = min(
            (req / meas for req, meas in zip(required(uniform), fractions(r, uniform)) if meas > 0), default=0.5
        )
        target = predicted * min(factor, 0.9)
    return tries


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _effective_bits(cost: dict, s, keep: list[str], shapes: dict) -> float:
    """Bits per quantized-module weight of a mixed checkpoint: GPTQ's layout, 16 for the kept modules."""
    total = sum(_numel(shapes[n + ".weight"]) for n in cost)
    kept = sum(_numel(shapes[n + ".weight"]) for n in keep)
    return ((total - kept) * gptq.bits_per_weight(s) + kept * 16) / total


def _budget(cfg, cal, device, rec, offload: bool) -> Path:
    """Try the budget's settings from the smallest checkpoint up (with ``allocate``: each setting over
    budget also with its most sensitive modules in 16-bit); publish the smallest checkpoint within
    budget as ``gptq``."""
    rq, layout, b = cfg.requantize, cfg.layout, cfg.requantize.budget
    settings = sorted((gptq.resolve(rq, s) for s in b.settings), key=gptq.bits_per_weight)
    wins = text_windows(
        load_tokenizer(layout.merged, cfg), cfg.verify.data, cfg.verify.seq_len, "verify.data", role="verify"
    )
    ref = ReferenceCache(reference_model(cfg, cfg.effective_adapter, device))
    tried: list[BudgetTry] = []
    for s in settings:
        out = layout.gptq_alternative(gptq.tag(s, rq))
        r: BudgetTry = {
            **build(cfg, s, out, cal(s), device, offload),
            **within_budget(cfg, out, ref, wins, device),
        }
        log(
            f"requantize: budget: {gptq.tag(s, rq)} perplexity {r['perplexity_increase']:+.2%}, KL "
            f"{r['kl_divergence']:.4g} -> {'within budget' if r['within_budget'] else 'over budget'}"
        )
        tried.append(r)
        if r["within_budget"]:
            break  # every later setting is larger
        if b.allocate:
            tried += _allocate(cfg, s, out, r, ref, wins, device, cal(s)[0])
        if not b.keep_tries:
            shutil.rmtree(out)  # a rejected checkpoint is not kept
            r["artefact"] = None
    within_tries = [t for t in tried if t["within_budget"]]
    best = min(within_tries, key=lambda t: t["size_bytes"]) if within_tries else None
    for t in tried:
        t["chosen"] = t is best
        if t is best:
            shutil.rmtree(layout.gptq, ignore_errors=True)
            Path(t["artefact"]).rename(layout.gptq)
            t["artefact"] = str(layout.gptq)
        elif t["within_budget"] and not b.keep_tries and t.get("artefact"):
            shutil.rmtree(t["artefact"])  # within budget but larger than the chosen one
            t["artefact"] = None
    rec["budget"] = {
        "max_perplexity_increase": b.max_perplexity_increase,
        "max_kl": b.max_kl,
        "reference_perplexity": tried[0]["reference_perplexity"] if tried else None,
        "data": cfg.verify.data.name,
        "tried": tried,
        "chosen": best["tag"] if best else None,
        "allocate": b.allocate.model_dump() if b.allocate else None,
    }
    if best is None:
        raise VerificationError(
            "no GPTQ setting is within the quality budget; tried: "
            + ", ".join(f"{t['tag']} ({t['perplexity_increase']:+.2%}, KL {t['kl_divergence']:.3g})" for t in tried)
        )
    return layout.gptq


def run(cfg) -> Path | None:
    """Stage entry: GPTQ of ``merged/`` into ``gptq/`` (with ``budget``: the smallest setting within
    budget), plus ``gptq-<tag>/`` for each of ``alternatives``. None when disabled.

    Raises:
        InputError: ``merged/`` missing, a group size that does not divide the layers, too little
            calibration text.
        VerificationError: a checkpoint does not reload, or no setting is within the budget.
    """
    rq, layout = cfg.requantize, cfg.layout
    with stage_record(layout, "requantize", fingerprint.inputs(cfg, "requantize")) as rec:
        if not rq.enabled:
            rec.update(status="skipped", artefact=None)
            return None
        if not layout.merged.is_dir():
            raise InputError(f"{layout.merged} is missing: run the merge and verify stages first.")
        merged = Checkpoint(layout.merged, what="merged checkpoint")
        from transformers import AutoConfig

        from pipeline.bnb4 import conv1d_names

        widths = gptq.linear_in_features(merged.shapes(), conv1d_names(AutoConfig.from_pretrained(layout.merged)))
        gptq.check_group_sizes(gptq.settings_to_check(rq), widths)  # refuse before any work
        device = apply_runtime(cfg.runtime)
        offload = layerwise_wanted(cfg, sum(t.numel for t in merged.tensors.values()))
        tok = load_tokenizer(layout.merged, cfg)
        sets: dict = {}

        def cal(s):
            """The calibration rows and composition of setting ``s`` (each set built once)."""
            key = (s.calibration.model_dump_json(), s.num_samples, s.seq_len)
            if key not in sets:
                sets[key] = calibration_set(tok, s.calibration, s.num_samples, s.seq_len)
                log("requantize: calibration " + describe_calibration(sets[key][1]))
            return sets[key]

        for s in [gptq.resolve(rq, a) for a in rq.alternatives] + [
            gptq.resolve(rq, b) for b in (rq.budget.settings if rq.budget else [])
        ]:
            cal(s)  # every calibration set is checked before the first GPTQ run
        calib, composition = cal(rq)
        if rq.budget:
            out = _budget(cfg, cal, device, rec, offload)
            main = next(t for t in rec["budget"]["tried"] if t.get("chosen"))
        else:
            out = layout.gptq
            main = build(cfg, rq, out, cal(rq), device, offload)
        rec.update(main)
        rec["alternatives"] = [
            build(cfg, s, layout.gptq_alternative(gptq.tag(s, rq)), cal(s), device, offload)
            for s in (gptq.resolve(rq, a) for a in rq.alternatives)
        ]
        for b in rec["alternatives"]:
            if b["calibration"] != rq.calibration.name:
                b["calibration_composition"] = next(c for _, c in sets.values() if c["name"] == b["calibration"])
        rec.update(
            offload_to_disk=offload,
            damp_percent=rq.damp_percent,
            calibration=rq.calibration.name,
            calibration_rows=len(calib),
            calibration_tokens=composition["tokens"],
            calibration_composition=composition,
            engine="gptqmodel",
        )
    return out
