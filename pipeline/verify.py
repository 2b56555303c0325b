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

import shutil
from pathlib import Path

import torch

from eval.metrics import ReferenceStore, score
from pipeline.checkpoint import AdapterFiles, Checkpoint
from pipeline.common import log, within
from pipeline.errors import InputError, VerificationError
from pipeline.layout import MERGE_BASES
from pipeline.models import apply_runtime, load_causal_lm, load_tokenizer, reference_model, scoring_dtype
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


def _unmerged_original(cfg, adapter: AdapterFiles, device: str):
    """The full-precision base with the adapter applied unmerged by PEFT (the ``original``
    candidate's own unmerged model)."""
    from peft import PeftModel

    model = load_causal_lm(cfg.base.path, cfg, device=device, dtype=torch.float32)
    emb = model.get_input_embeddings()
    rows = adapter.embedding_rows(next(n for n, m in model.named_modules() if m is emb))
    if rows and rows != emb.weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    return PeftModel.from_pretrained(model, str(adapter.folder)).eval()


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


def _check_candidate(cfg, base: str, wins, ref_store, device, adapter, adapted, resized, max_kl) -> VerifyCandidate:
    """Structural checks and the KL gate for ``merged-<base>.unverified``; its figures against the reference."""
    layout = cfg.layout
    path = layout.candidate(base)
    base_ckpt = layout.dequantized if base == "dequantized" and layout.dequantized.is_dir() else cfg.base.path
    problems = structural_checks(path, base_ckpt, adapted, resized)
    model = load_causal_lm(path, cfg, device=device, dtype=scoring_dtype(cfg.out_dtype, device))
    if base == "dequantized":
        s_ref = s_exact = score(model, wins, ref=ref_store, progress=f"verify: merged ({base})")
    else:
        del model
        with ReferenceStore(len(wins), wins.shape[1], ref_store.vocab, folder=layout.scratch) as own:
            score(_unmerged_original(cfg, adapter, device), wins, store=own, progress="verify: original unmerged")
            model = load_causal_lm(path, cfg, device=device, dtype=scoring_dtype(cfg.out_dtype, device))
            s_exact = score(model, wins, ref=own, progress=f"verify: merged ({base})")
        s_ref = score(model, wins, ref=ref_store)
    del model
    problems += _exactness_problems(s_exact, max_kl, base)
    return {
        "passed": not problems,
        "problems": problems,
        "exact_kl": s_exact["kl_divergence"],
        "kl_divergence": s_ref["kl_divergence"],
        "kl_max": s_ref["kl_max"],
        "top1_agreement": s_ref["top1_agreement"],
        "perplexity": s_ref["perplexity"],
    }


def _publish(layout, results: dict[str, VerifyCandidate], chosen: str) -> None:
    """Rename the candidates: passed ones to ``merged``/``merged-<base>`` (only when the chosen one
    passed), failed ones to ``merged-<base>.rejected``."""
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
    with stage_record(layout, "verify") as rec:
        device = apply_runtime(cfg.runtime)
        merge_rec = read_record(layout, "merge") or {}
        adapter = AdapterFiles(cfg.effective_adapter, cfg.adapter.allow_pickle)
        changed = adapter.changed_modules()
        adapted = changed["lora"] + changed["full"]
        wins = text_windows(
            load_tokenizer(layout.candidate(cands[0]), cfg), v.data, v.seq_len, "verify.data", role="verify"
        )
        log(f"verify: {cands} on {wins.numel()} tokens of '{v.data.name}', exactness bound {max_kl:g} nats/token")
        ref = reference_model(cfg, adapter.folder, device)
        vocab = ref.get_output_embeddings().weight.shape[0]
        with ReferenceStore(len(wins), v.seq_len, vocab, folder=layout.scratch) as ref_store:
            ref_score = score(ref, wins, store=ref_store, progress="verify: reference")
            del ref
            results = {
                b: _check_candidate(
                    cfg, b, wins, ref_store, device, adapter, adapted, merge_rec.get("resized_vocab"), max_kl
                )
                for b in cands
            }
        if ref_score.get("nonfinite"):
            for r in results.values():
                r["passed"] = False
                r["problems"].insert(
                    0,
                    f"the reference (4-bit base + adapter, as PEFT runs it) gives non-finite "
                    f"logits in {ref_score['nonfinite']} windows; nothing can be verified against it",
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
            tokens=ref_score["tokens"],
            data=v.data.name,
            reference_perplexity=ref_score["perplexity"],
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
