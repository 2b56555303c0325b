"""Stage 3, verify: a gate between merge and everything after it; it also picks the merge base.

For each candidate ``<run_dir>/merged-<base>.unverified`` (``base``: dequantized, original):

1. no LoRA tensor is left in the checkpoint;
2. every tensor of the base is there with the same shape (rows of the embeddings may
   differ when the adapter resized the vocabulary);
3. every adapted weight changed (an unchanged one means the adapter was lost);
4. the merge is exact: mean per-token ``KL(P_unmerged || P_merged)`` on held-out text is at
   most ``max_kl``, where the unmerged model is the same base with the adapter applied
   unmerged: the 4-bit base (the trained model, "the reference") for ``dequantized``, the
   full-precision base for ``original``.

Both candidates are also measured against the reference (KL, perplexity). The chosen one
(``merge.base``; ``auto``: the lower perplexity on the verify text) is published as
``<run_dir>/merged``, the other as ``<run_dir>/merged-<base>``. A candidate that fails is
renamed ``merged-<base>.rejected``; if the chosen one fails, :class:`VerificationError`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from eval.metrics import ReferenceStore, score
from pipeline.common import compute_dtype_for, log, pick_device, stage_record, text_windows
from pipeline.errors import InputError, VerificationError

import torch  # noqa: E402

# Default bound on the mean KL (nats/token) by the coarser of output and compute dtype.
# The reference runs in the compute dtype, so its own rounding noise sets the floor.
# On CPU the merged model runs in float32 (its weights upcast exactly), so the KL
# measures the merge and the output rounding, not half-precision activations.
DEFAULT_MAX_KL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}
_ORDER = ["float32", "float16", "bfloat16"]


def default_max_kl(dtype: str, compute_dtype: str) -> float:
    """Default KL bound (nats/token) for an output ``dtype`` checked against a reference in ``compute_dtype``."""
    return DEFAULT_MAX_KL[max(dtype, compute_dtype, key=_ORDER.index)]


def _tensors(folder: Path) -> dict:
    """name -> (file, shape) of every tensor in a safetensors checkpoint, without loading the data."""
    from safetensors import safe_open
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = (f, tuple(h.get_slice(k).get_shape()))
    return out


def _load(f: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(f, "pt") as h:
        return h.get_tensor(key)


def structural_checks(merged: Path, base: Path, adapted: list[str], vocab_rows: int | None = None) -> list[str]:
    """Return a list of problems (empty when the checkpoint is structurally sound).

    ``adapted`` are module names like ``model.layers.0.self_attn.q_proj``; their ``.weight``
    must differ from the base's. ``vocab_rows``: the adapter's vocabulary size when it was
    resized (embedding rows may then differ). One tensor at a time is loaded.
    """
    m, b = _tensors(merged), _tensors(base)
    problems = [f"LoRA tensor left in merged checkpoint: {k}" for k in m if "lora_" in k]
    for k, (_, shape) in b.items():
        if k not in m:
            problems.append(f"tensor missing from merged checkpoint: {k}")
        elif m[k][1] != shape and not (vocab_rows and m[k][1] == (vocab_rows, *shape[1:])):
            problems.append(f"shape of {k}: merged {m[k][1]} vs base {shape}")
    for name in adapted:
        k = f"{name}.weight"
        if k in m and k in b and m[k][1] == b[k][1] and torch.equal(_load(m[k][0], k).float(), _load(b[k][0], k).float()):
            problems.append(f"adapted weight unchanged (adapter lost?): {k}")
    return problems


def reference_model(cfg):
    """The reference: the 4-bit base (loaded fresh) with the adapter applied unmerged, in eval mode."""
    from pipeline.dequantize import load_4bit_base
    from pipeline.merge import apply_adapter, effective_adapter
    return apply_adapter(load_4bit_base(cfg), effective_adapter(cfg))[0]


def _original_unmerged(cfg, device):
    from transformers import AutoModelForCausalLM
    from pipeline.merge import apply_adapter, effective_adapter
    model = AutoModelForCausalLM.from_pretrained(cfg.base.path, dtype=torch.float32, device_map={"": device})
    return apply_adapter(model, effective_adapter(cfg))[0]


def _load_merged(path: Path, cfg, device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype_for(cfg.out_dtype, device),
                                                device_map={"": device}).eval()


def choose(want: str, results: dict) -> tuple[str, str]:
    """(chosen merge base, reason) from per-candidate ``results`` (``passed``, ``perplexity``)."""
    ok = {b: r for b, r in results.items() if r["passed"]}
    if want != "auto":
        return want, f"merge.base is '{want}'"
    if not ok:
        return "dequantized", "no candidate passed"
    best = min(ok, key=lambda b: (ok[b]["perplexity"], b != "dequantized"))
    ppl = ", ".join(f"{b} {r['perplexity']:.4f}" for b, r in results.items())
    return best, f"auto: lowest perplexity on the verify text ({ppl})"


def run(cfg) -> Path:
    """Stage entry: verify each ``merged-<base>.unverified``, publish the chosen one as ``<run_dir>/merged``.

    Raises:
        VerificationError: the chosen candidate failed; it is moved to ``merged-<base>.rejected``.
    """
    from transformers import AutoTokenizer
    from pipeline.merge import adapted_modules, effective_adapter
    rd, v = cfg.run_dir, cfg.verify
    max_kl = v.max_kl or default_max_kl(cfg.out_dtype, cfg.dequantize.compute_dtype)
    cands = [b for b in ("dequantized", "original") if (rd / f"merged-{b}.unverified").is_dir()]
    if not cands:
        raise InputError(f"no merged checkpoint to verify in {rd}: run the merge stage first")
    device = pick_device(cfg.dequantize.device)
    with stage_record(rd, "verify") as rec:
        merge_rec = json.loads((rd / "stages" / "merge.json").read_text())
        adapted = adapted_modules(effective_adapter(cfg))
        tok = AutoTokenizer.from_pretrained(rd / f"merged-{cands[0]}.unverified")
        wins = text_windows(tok, v.data, v.seq_len, "verify.data")
        log(f"verify: {cands} on {wins.numel()} tokens of '{v.data.name}', exactness bound {max_kl:g} nats/token")
        ref = reference_model(cfg)
        vocab = ref.get_output_embeddings().weight.shape[0]
        stores = {"reference": ReferenceStore(len(wins), v.seq_len, vocab, folder=rd)}
        results = {}
        try:
            ref_score = score(ref, wins, store=stores["reference"], progress="verify: reference")
            del ref
            for base in cands:
                path = rd / f"merged-{base}.unverified"
                base_dir = rd / "dequantized" if base == "dequantized" else Path(cfg.base.path)
                problems = structural_checks(path, base_dir, adapted, merge_rec.get("resized_vocab"))
                if base == "original":
                    stores["original"] = ReferenceStore(len(wins), v.seq_len, vocab, folder=rd)
                    score(_original_unmerged(cfg, device), wins, store=stores["original"], progress="verify: original unmerged")
                model = _load_merged(path, cfg, device)
                s_ref = score(model, wins, ref=stores["reference"], progress=f"verify: merged ({base})")
                s_exact = s_ref if base == "dequantized" else score(model, wins, ref=stores["original"])
                del model
                if s_exact["kl_divergence"] > max_kl:
                    problems.append(f"merge onto the {base} weights is not exact: mean KL(unmerged || merged) "
                                    f"{s_exact['kl_divergence']:.3g} nats/token exceeds the bound {max_kl:g}")
                results[base] = {"passed": not problems, "problems": problems, "exact_kl": s_exact["kl_divergence"],
                                 "kl_divergence": s_ref["kl_divergence"], "kl_max": s_ref["kl_max"],
                                 "top1_agreement": s_ref["top1_agreement"], "perplexity": s_ref["perplexity"]}
        finally:
            for s in stores.values():
                s.close()
        chosen, reason = choose(cfg.merge.base, results)
        publish = results[chosen]["passed"]  # nothing is published when the chosen candidate failed
        for base, r in results.items():
            src = rd / f"merged-{base}.unverified"
            if not r["passed"]:
                dst = rd / f"merged-{base}.rejected"
            elif not publish:
                continue
            else:
                dst = rd / ("merged" if base == chosen else f"merged-{base}")
            shutil.rmtree(dst, ignore_errors=True)
            src.rename(dst)
            r["artefact"] = str(dst)
        c = results[chosen]
        rec.update(passed=c["passed"], problems=c["problems"], kl_divergence=c["exact_kl"], kl_max=c["kl_max"],
                   top1_agreement=c["top1_agreement"], max_kl=max_kl, tokens=ref_score["tokens"], data=v.data.name,
                   reference_perplexity=ref_score["perplexity"], merge_base=chosen, merge_base_reason=reason,
                   candidates=results, adapted_modules=len(adapted))
        if not c["passed"]:
            rec["status"] = "failed"
            raise VerificationError(f"merge verification failed; nothing published (kept for inspection at "
                                    f"{c['artefact']}):\n  " + "\n  ".join(c["problems"]))
        log(f"verify: passed; merge base '{chosen}' ({reason}); KL {c['exact_kl']:.3g}, "
            f"top-1 agreement {c['top1_agreement']:.4f}")
    return rd / "merged"
