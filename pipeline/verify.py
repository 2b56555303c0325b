"""Stage 3, verify: a gate between merge and everything after it; it also picks the merge base.

For each candidate ``merged-<base>.unverified`` (``base``: dequantized, original):

1. no LoRA tensor is left in the checkpoint;
2. every tensor of the base is there with the same shape (rows of the embeddings may
   differ when the adapter resized the vocabulary);
3. every adapted weight changed (an unchanged one means the adapter was lost);
4. the merge is exact: mean per-token ``KL(P_unmerged || P_merged)`` on held-out text is at
   most ``max_kl``, where the unmerged model is what PEFT runs: the base loaded as training
   loaded it (the 4-bit base for ``dequantized``, the full-precision base for ``original``)
   with the adapter applied by ``PeftModel.from_pretrained`` and nothing else
   (:func:`pipeline.models.reference_model`). The merge code is never used to build it.

Every bound fails closed (``not (x <= bound)``): NaN or inf logits on either side fail, named.
Both candidates are also measured against the reference (KL, perplexity). The chosen one
(``merge.base``; ``auto``: the lower perplexity on the verify text) is published as
``merged/``, the other as ``merged-<base>/``. A candidate that fails is renamed
``merged-<base>.rejected``; if the chosen one fails, :class:`VerificationError`.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import torch

from eval.metrics import ReferenceCache, score
from pipeline import fingerprint
from pipeline.checkpoint import AdapterFiles, Checkpoint
from pipeline.common import check_not_orphaned, log, within
from pipeline.errors import InputError, VerificationError
from pipeline.layout import MERGE_BASES
from pipeline.models import (
    apply_runtime,
    checkpoint_source,
    layerwise_wanted,
    load_tokenizer,
    reference_source,
    scoring_dtype,
    unmerged_original_source,
)
from pipeline.records import VerifyCandidate, read_record, stage_record
from pipeline.textdata import text_windows

# Default bound on the mean KL (nats/token) by the coarser of output and compute dtype.
# The reference runs in the compute dtype, so its own rounding noise sets the floor.
DEFAULT_MAX_KL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}
_ORDER = ["float32", "float16", "bfloat16"]


def default_max_kl(dtype: str, compute_dtype: str) -> float:
    """Default KL bound (nats/token) for an output ``dtype`` checked against a reference in ``compute_dtype``."""
    return DEFAULT_MAX_KL[max(dtype, compute_dtype, key=_ORDER.index)]


def structural_checks(merged: Path, base: Path, adapted: list[str], vocab_rows: int | None = None) -> list[str]:
    """Return a list of problems (empty when the checkpoint is structurally sound).

    ``merged`` and ``base`` are checkpoints (folders or hub ids; a bnb 4-bit base is compared by
    its unpacked shapes). ``adapted`` are module names like ``model.layers.0.self_attn.q_proj``;
    their ``.weight`` must differ from the base's when ``base`` is full precision with the same
    shape. ``vocab_rows``: the adapter's vocabulary size when it was resized (embedding rows
    may then differ). One tensor at a time is loaded.
    """
    m, b = Checkpoint(merged, what="merged checkpoint"), Checkpoint(base)
    ms, bs = m.shapes(), b.shapes()
    problems = [f"LoRA tensor left in merged checkpoint: {k}" for k in ms if "lora_" in k]
    for k, shape in bs.items():
        if k not in ms:
            problems.append(f"tensor missing from merged checkpoint: {k}")
        elif ms[k] != shape and not (vocab_rows and ms[k] == (vocab_rows, *shape[1:])):
            problems.append(f"shape of {k}: merged {list(ms[k])} vs base {list(shape)}")
    if not bs:
        problems.append(f"the base checkpoint {base} lists no tensors to compare with")
    if not b.is_bnb_4bit:
        for name in adapted:
            k = f"{name}.weight"
            if k in ms and k in bs and ms[k] == bs[k] and torch.equal(m.get(k).float(), b.get(k).float()):
                problems.append(f"adapted weight unchanged (adapter lost?): {k}")
    return problems


def choose(want: str, results: dict[str, VerifyCandidate]) -> tuple[str, str]:
    """(chosen merge base, reason) from per-candidate ``results`` (``passed``, ``perplexity``)."""
    ok = {b: r for b, r in results.items() if r["passed"]}
    if want != "auto":
        return want, f"merge.base is '{want}'"
    if not ok:
        return "dequantized", "no candidate passed"
    best = min(ok, key=lambda b: (ok[b]["perplexity"], b != "dequantized"))
    ppl = ", ".join(f"{b} {r['perplexity']:.4f}" for b, r in results.items())
    return best, f"auto: lowest perplexity on the verify text ({ppl})"


def _exactness_problems(s: dict, max_kl: float, base: str) -> list[str]:
    """The gate on one candidate's score against its own unmerged model (fails closed)."""
    problems = []
    if s.get("nonfinite"):
        problems.append(
            f"non-finite logits (inf/NaN) in {s['nonfinite']} of the verify windows, on the merged "
            f"({base}) or the unmerged side; the KL is undefined"
        )
    if not within(s["kl_divergence"], max_kl):
        problems.append(
            f"merge onto the {base} weights is not exact: mean KL(unmerged || merged) "
            f"{s['kl_divergence']:.3g} nats/token exceeds the bound {max_kl:g}"
        )
    return problems


_DTYPE_MAX = {"float16": 65504.0}


@contextlib.contextmanager
def activation_range(model, dtype_name: str):
    """Record, with forward hooks, the first module whose output leaves the range of ``dtype_name``
    (float16: |x| > 65504) while ``model`` runs (in float32 on CPU). Yields a dict that holds
    ``first`` (module name, max |output|) or nothing; a no-op for dtypes with float32's range."""
    found: dict = {}
    limit = _DTYPE_MAX.get(dtype_name)
    handles = []
    if limit is not None:
        target = model.model if hasattr(model, "filler") else model

        def hook(name):
            def fn(module, args, out):
                t = out[0] if isinstance(out, tuple) else out
                if "first" not in found and isinstance(t, torch.Tensor) and t.is_floating_point():
                    peak = t.detach().abs().max().item() if t.numel() else 0.0
                    if peak > limit:
                        found["first"] = (name, peak)

            return fn

        for name, m in target.named_modules():
            if name:
                handles.append(m.register_forward_hook(hook(name)))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def _check_candidate(
    cfg, base: str, wins, ref, device, adapter, adapted, resized, max_kl, layerwise
) -> VerifyCandidate:
    """Structural checks, the activation range of the output dtype, and the KL gate for
    ``merged-<base>.unverified``; its figures against the reference."""
    layout = cfg.layout
    path = layout.candidate(base)
    base_ckpt = layout.dequantized if base == "dequantized" and layout.dequantized.is_dir() else cfg.base.path
    problems = structural_checks(path, base_ckpt, adapted, resized)
    model = checkpoint_source(path, cfg, device, scoring_dtype(cfg.out_dtype, device), layerwise)
    if base == "original":
        own = unmerged_original_source(cfg, adapter.folder, device, layerwise)
        s_exact = score(model, wins, ref=own, progress="verify: original, against its own unmerged model")
        del own
    with activation_range(model, cfg.out_dtype) as overflow:
        s_ref = score(model, wins, ref=ref, progress=f"verify: merged ({base}) against the reference")
    if base == "dequantized":
        s_exact = s_ref
    del model
    if "first" in overflow:
        name, peak = overflow["first"]
        problems.append(
            f"activations leave the {cfg.out_dtype} range: module '{name}' outputs |x| = {peak:.4g} > "
            f"{_DTYPE_MAX[cfg.out_dtype]:g}; run in {cfg.out_dtype}, the published checkpoint would give "
            "inf/NaN. Set dequantize.dtype: bfloat16."
        )
    problems += _exactness_problems(s_exact, max_kl, base)
    return {
        "passed": not problems,
        "problems": problems,
        "exact_kl": s_exact["kl_divergence"],
        "kl_divergence": s_ref["kl_divergence"],
        "kl_max": s_ref["kl_max"],
        "top1_agreement": s_ref["top1_agreement"],
        "perplexity": s_ref["perplexity"],
        "reference_perplexity": float(np.exp(s_ref["ref_nll_per_window"].sum() / s_ref["tokens"])),
        "reference_nonfinite": s_ref["ref_nonfinite"],
    }


def _publish(layout, results: dict[str, VerifyCandidate], chosen: str) -> None:
    """Rename the candidates: passed ones to ``merged``/``merged-<base>`` (only when the chosen one
    passed), failed ones to ``merged-<base>.rejected``. An orphaned stage process (its ``run``
    parent died) renames nothing (:func:`pipeline.common.check_not_orphaned`)."""
    check_not_orphaned()
    publish = results[chosen]["passed"]
    for base, r in results.items():
        src = layout.candidate(base)
        if not r["passed"]:
            dst = layout.rejected(base)
        elif not publish:
            continue
        else:
            dst = layout.merged if base == chosen else layout.merged_other(base)
        shutil.rmtree(dst, ignore_errors=True)
        src.rename(dst)
        r["artefact"] = str(dst)


def run(cfg) -> Path:
    """Stage entry: verify each ``merged-<base>.unverified``, publish the chosen one as ``merged/``.

    Raises:
        InputError: no candidate to verify (run the merge stage first), or a verify text too short.
        VerificationError: the chosen candidate failed; it is moved to ``merged-<base>.rejected``.
    """
    layout, v = cfg.layout, cfg.verify
    max_kl = v.max_kl or default_max_kl(cfg.out_dtype, cfg.dequantize.compute_dtype)
    cands = [b for b in MERGE_BASES if layout.candidate(b).is_dir()]
    if not cands:
        raise InputError(f"no merged checkpoint to verify in {layout.root}: run the merge stage first")
    if cfg.merge.base != "auto" and cfg.merge.base not in cands:
        raise InputError(
            f"{layout.candidate(cfg.merge.base)} (merge.base '{cfg.merge.base}') is missing in {layout.root}: "
            "run the merge stage first"
        )
    with stage_record(layout, "verify", fingerprint.inputs(cfg, "verify")) as rec:
        rec["consumed"] = {layout.candidate(b).name: fingerprint.path_fingerprint(layout.candidate(b)) for b in cands}
        device = apply_runtime(cfg.runtime)
        merge_rec = read_record(layout, "merge") or {}
        adapter = AdapterFiles(cfg.effective_adapter, cfg.adapter.allow_pickle)
        changed = adapter.changed_modules()
        adapted = changed["lora"] + changed["full"]
        wins = text_windows(
            load_tokenizer(layout.candidate(cands[0]), cfg), v.data, v.seq_len, "verify.data", role="verify"
        )
        base = Checkpoint(cfg.base.path)
        layerwise = layerwise_wanted(cfg, sum(t.numel for t in base.tensors.values()))
        log(
            f"verify: {cands} on {wins.numel()} tokens of '{v.data.name}', exactness bound {max_kl:g} nats/token"
            f"{', one decoder layer at a time' if layerwise else ''}"
        )
        ref = ReferenceCache(reference_source(cfg, adapter.folder, device, layerwise))
        results = {}
        for b in cands:
            results[b] = _check_candidate(
                cfg, b, wins, ref, device, adapter, adapted, merge_rec.get("resized_vocab"), max_kl, layerwise
            )
            if ref.complete:
                ref.model = None  # every window's log-probs are kept: the reference model is no longer needed
        del ref
        ref_ppl = next(r["reference_perplexity"] for r in results.values())
        if any(r.get("reference_nonfinite") for r in results.values()) or not np.isfinite(ref_ppl):
            for r in results.values():
                r["passed"] = False
                r["problems"].insert(
                    0,
                    "the reference (4-bit base + adapter, as PEFT runs it) gives non-finite "
                    "logits; nothing can be verified against it (a float16 compute dtype "
                    "overflowing? train and merge with bfloat16)",
                )
        chosen, reason = choose(cfg.merge.base, results)
        _publish(layout, results, chosen)
        c = results[chosen]
        rec.update(
            passed=c["passed"],
            problems=c["problems"],
            kl_divergence=c["exact_kl"],
            kl_max=c["kl_max"],
            top1_agreement=c["top1_agreement"],
            max_kl=max_kl,
            tokens=int(wins[:, 1:].numel()),
            data=v.data.name,
            reference_perplexity=ref_ppl,
            layerwise=layerwise,
            merge_base=chosen,
            merge_base_reason=reason,
            candidates=results,
            adapted_modules=len(adapted),
            artefact=c.get("artefact"),
        )
        if not c["passed"]:
            rec["status"] = "failed"
            raise VerificationError(
                f"merge verification failed; nothing published (kept for inspection at "
                f"{c.get('artefact')}):\n  " + "\n  ".join(c["problems"])
            )
        log(
            f"verify: passed; merge base '{chosen}' ({reason}); KL {c['exact_kl']:.3g}, "
            f"top-1 agreement {c['top1_agreement']:.4f}"
        )
    return layout.merged
