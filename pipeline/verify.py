"""Stage 3, verify: a gate between merge and everything after it.

Checks on ``<run_dir>/merged.unverified`` against the dequantized base and the
reference (the 4-bit base with the adapter applied unmerged, as during training):

1. no LoRA tensor is left in the checkpoint;
2. every tensor the base has is there with the same shape;
3. every adapted weight changed (a zero delta means the adapter was lost);
4. on held-out text, the mean per-token ``KL(P_ref || P_merged)`` is at most ``max_kl``.

Pass: the folder is renamed to ``<run_dir>/merged``. Fail: it is renamed to
``<run_dir>/merged.rejected`` (kept for inspection) and :class:`VerificationError` is raised.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from eval.metrics import ReferenceStore, score, windows
from pipeline.common import compute_dtype_for, log, pick_device, stage_record, token_stream
from pipeline.errors import VerificationError

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


def structural_checks(merged: Path, base: Path, adapted: list[str]) -> list[str]:
    """Return a list of problems (empty when the checkpoint is structurally sound).

    ``adapted`` are module names like ``model.layers.0.self_attn.q_proj``; their
    ``.weight`` must differ from the base's. One tensor at a time is loaded.
    """
    m, b = _tensors(merged), _tensors(base)
    problems = [f"LoRA tensor left in merged checkpoint: {k}" for k in m if "lora_" in k]
    for k, (_, shape) in b.items():
        if k not in m:
            problems.append(f"tensor missing from merged checkpoint: {k}")
        elif m[k][1] != shape:
            problems.append(f"shape of {k}: merged {m[k][1]} vs base {shape}")
    for name in adapted:
        k = f"{name}.weight"
        if k in m and k in b and torch.equal(_load(m[k][0], k).float(), _load(b[k][0], k).float()):
            problems.append(f"adapted weight unchanged (adapter lost?): {k}")
    return problems


def reference_model(cfg):
    """The reference: the 4-bit base (loaded fresh) with the adapter applied unmerged, in eval mode."""
    from peft import PeftModel
    from pipeline.dequantize import load_4bit_base
    return PeftModel.from_pretrained(load_4bit_base(cfg), cfg.adapter.path).eval()


def run(cfg) -> Path:
    """Stage entry: verify ``<run_dir>/merged.unverified`` and publish it as ``<run_dir>/merged``.

    Raises:
        VerificationError: any check failed; the artefact is moved to ``merged.rejected``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    merged, dequantized, final = (cfg.run_dir / n for n in ("merged.unverified", "dequantized", "merged"))
    v = cfg.verify
    max_kl = v.max_kl or default_max_kl(cfg.dequantize.dtype, cfg.dequantize.compute_dtype)
    with stage_record(cfg.run_dir, "verify") as rec:
        from pipeline.merge import adapted_modules
        adapted = adapted_modules(cfg.adapter.path)
        problems = structural_checks(merged, dequantized, adapted)
        tok = AutoTokenizer.from_pretrained(merged)
        wins = windows(token_stream(tok, v.data), v.seq_len)
        log(f"verify: KL(reference || merged) on {wins.numel()} tokens of '{v.data.name}', bound {max_kl:g}")
        ref = reference_model(cfg)
        store = ReferenceStore(len(wins), v.seq_len, ref.get_output_embeddings().weight.shape[0], folder=cfg.run_dir)
        try:
            score(ref, wins, store=store, progress="verify: reference")
            del ref
            device = pick_device(cfg.dequantize.device)
            model = AutoModelForCausalLM.from_pretrained(
                merged, dtype=compute_dtype_for(cfg.dequantize.dtype, device), device_map={"": device}).eval()
            s = score(model, wins, ref=store, progress="verify: merged")
        finally:
            store.close()
        if s["kl_divergence"] > max_kl:
            problems.append(f"mean KL(reference || merged) {s['kl_divergence']:.3g} nats/token exceeds the bound {max_kl:g}")
        passed = not problems
        rec.update(passed=passed, problems=problems, kl_divergence=s["kl_divergence"], kl_max=s["kl_max"],
                   top1_agreement=s["top1_agreement"], max_kl=max_kl, tokens=s["tokens"], data=v.data.name,
                   adapted_modules=len(adapted))
        if not passed:
            rejected = cfg.run_dir / "merged.rejected"
            shutil.rmtree(rejected, ignore_errors=True)
            merged.rename(rejected)
            rec["status"] = "failed"
            rec["artefact"] = str(rejected)
            raise VerificationError("merge verification failed; nothing published (kept for inspection at "
                                    f"{rejected}):\n  " + "\n  ".join(problems))
        shutil.rmtree(final, ignore_errors=True)
        merged.rename(final)
        rec["artefact"] = str(final)
        log(f"verify: passed (KL {s['kl_divergence']:.3g}, top-1 agreement {s['top1_agreement']:.4f})")
    return final
