"""Stage 2, merge: fold the LoRA adapter into the base weights.

For each adapted linear, ``W' = W + scaling * B @ A`` with PEFT's own rules (``lora_alpha / r``,
``lora_alpha / sqrt(r)`` with rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern``, DoRA's
magnitude renormalisation, ``modules_to_save`` copies, LoRA on embeddings), computed by PEFT
itself (``peft/tuners/lora/layer.py``: ``get_delta_weight``, ``merge``) through
``merge_and_unload()`` in float32, then cast once to the output dtype. Never on the 4-bit
model: there PEFT re-quantizes to NF4 and rounds most of the adapter away.

Merge bases (``merge.base``): ``dequantized`` (the weights the adapter was trained against)
and ``original`` (the full-precision checkpoint). Each candidate is written to
``<run_dir>/merged-<base>.unverified``; the verify stage checks and publishes them.

Before the adapter is applied, the base is made to match it: a vocabulary resized during
training is resized here too, and tied input/output embeddings are untied when the adapter
changes either (re-tied after the merge if both still hold the same matrix).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.adapter_checks import check_adapter
from pipeline.checkpoint import AdapterFiles, read_config
from pipeline.common import DTYPES, log, publish_dir
from pipeline.errors import InputError
from pipeline.models import apply_runtime, load_causal_lm, load_tokenizer
from pipeline.records import stage_record


def _module_name(model, module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def match_base_to_adapter(model, adapter: AdapterFiles) -> dict:
    """Resize the vocabulary to the adapter's and untie embeddings the adapter changes. In place.

    Returns:
        ``{"resized_vocab": rows or None, "untied": bool}``.
    """
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    emb_name, out_name = _module_name(model, emb), _module_name(model, out)
    rows = adapter.embedding_rows(emb_name)
    facts = {"resized_vocab": None, "untied": False}
    if rows and rows != emb.weight.shape[0]:
        log(f"merge: adapter vocabulary has {rows} rows, base {emb.weight.shape[0]}: resizing the base")
        model.resize_token_embeddings(rows, mean_resizing=False)
        facts["resized_vocab"] = rows
    touched = any(t.module in (emb_name, out_name) for t in adapter.parsed)
    if out is not None and touched and out.weight is model.get_input_embeddings().weight:
        out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
        for c in (model.config, model.config.get_text_config()):
            c.tie_word_embeddings = False
        facts["untied"] = True
    return facts


def apply_adapter(model, adapter: AdapterFiles):
    """``model`` (dequantized or original) with ``adapter`` attached unmerged, in eval mode.

    Returns:
        (``PeftModel``, facts from :func:`match_base_to_adapter`).
    """
    from peft import PeftModel

    facts = match_base_to_adapter(model, adapter)
    return PeftModel.from_pretrained(model, str(adapter.folder)).eval(), facts


def merge_into(model, adapter: AdapterFiles, dtype: torch.dtype):
    """Merge ``adapter`` into ``model`` (float32) with PEFT and cast once to ``dtype``.

    Embeddings untied for the merge are re-tied when they still hold the same matrix.

    Returns:
        (merged ``transformers`` model in ``dtype``, facts).
    """
    peft_model, facts = apply_adapter(model, adapter)
    merged = peft_model.merge_and_unload(progressbar=True)
    emb, out = merged.get_input_embeddings(), merged.get_output_embeddings()
    if facts["untied"] and torch.equal(emb.weight, out.weight):
        out.weight = emb.weight
        merged.config.tie_word_embeddings = True
        facts["untied"] = False
    return merged.to(dtype), facts


def check_finite(model, dtype_name: str) -> None:
    """Refuse weights with inf/NaN after the cast, naming the first bad tensor.

    Raises:
        InputError: a weight holds inf or NaN (for float16: suggests bfloat16).
    """
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            hint = (
                " Values above 65504 overflow float16: set dequantize.dtype: bfloat16."
                if dtype_name == "float16"
                else ""
            )
            raise InputError(f"merged weight '{name}' holds inf/NaN after the cast to {dtype_name}.{hint}")


def combine_adapters(cfg, model) -> Path:
    """Combine ``adapter.combine.adapters`` with PEFT's ``add_weighted_adapter`` into one LoRA
    adapter saved at ``<run_dir>/adapter-combined`` (reference and merge both use it)."""
    from peft import PeftModel

    c = cfg.adapter.combine
    names = [f"a{i}" for i in range(len(c.adapters))]
    pm = PeftModel.from_pretrained(model, c.adapters[0].path, adapter_name=names[0])
    for n, a in zip(names[1:], c.adapters[1:]):
        pm.load_adapter(a.path, adapter_name=n)
    torch.manual_seed(c.seed)  # DARE prunes at random
    kw = {"density": c.density} if c.density is not None else {}
    pm.add_weighted_adapter(names, [a.weight for a in c.adapters], "combined", combination_type=c.method, **kw)
    out = cfg.layout.combined_adapter
    with publish_dir(out) as tmp:
        pm.save_pretrained(tmp, selected_adapters=["combined"])
        for f in (tmp / "combined").iterdir():  # PEFT writes non-default adapters into a subfolder
            f.rename(tmp / f.name)
        (tmp / "combined").rmdir()
    pm.unload()
    return out


def original_available(cfg) -> bool:
    """True when the base checkpoint is full precision (not a saved bnb 4-bit checkpoint)."""
    return read_config(cfg.base.path).get("quantization_config") is None


def candidates(cfg) -> list[str]:
    """Merge bases to build: the configured one, plus the other when ``compare_bases`` and possible.

    Raises:
        InputError: ``merge.base: original`` with a base saved in 4-bit.
    """
    want = cfg.merge.base
    if want == "original" and not original_available(cfg):
        raise InputError(
            "merge.base is 'original' but the base is a saved bnb 4-bit checkpoint: the full-precision "
            "weights are not there. Point base.path at the full-precision checkpoint, or use 'dequantized'."
        )
    if want == "dequantized" and not cfg.merge.compare_bases:
        return ["dequantized"]
    if want == "original" and not cfg.merge.compare_bases:
        return ["original"]
    return ["dequantized", "original"] if original_available(cfg) else ["dequantized"]


def run(cfg) -> list[Path]:
    """Stage entry: merge the adapter into each merge base; returns the ``merged-<base>.unverified`` folders.

    Raises:
        InputError: an unmergeable adapter, ``dequantized/`` missing, a tokenizer larger than the
            merged embeddings, inf/NaN weights after the cast (float16 overflow).
    """
    layout = cfg.layout
    with stage_record(layout, "merge") as rec:
        facts = check_adapter(cfg)
        device = apply_runtime(cfg.runtime)
        dtype_name = cfg.out_dtype
        if not layout.dequantized.is_dir():
            raise InputError(f"{layout.dequantized} is missing: run the dequantize stage first (with dequantize.save).")

        def load_fp32(path):
            return load_causal_lm(path, cfg, device=device, dtype=torch.float32)

        if cfg.adapter.combine:
            log(f"merge: combining {len(cfg.adapter.combine.adapters)} adapters ({cfg.adapter.combine.method})")
            combine_adapters(cfg, load_fp32(layout.dequantized))
        adapter = AdapterFiles(cfg.effective_adapter, cfg.adapter.allow_pickle)
        outs, rec["candidates"] = [], {}
        for base in candidates(cfg):
            src = layout.dequantized if base == "dequantized" else cfg.base.path
            log(f"merge: adapter '{adapter.folder}' into the {base} weights ({src}), float32 -> {dtype_name}")
            merged, mfacts = merge_into(load_fp32(src), adapter, DTYPES[dtype_name])
            merged = merged.to("cpu")
            check_finite(merged, dtype_name)
            first = AdapterFiles(cfg.adapter.paths[0], cfg.adapter.allow_pickle)
            tok_src = (
                adapter.folder
                if adapter.tokenizer_saved
                else (first.folder if first.tokenizer_saved else layout.dequantized)
            )
            tok = load_tokenizer(tok_src, cfg)
            rows = merged.get_input_embeddings().weight.shape[0]
            if len(tok) > rows:
                raise InputError(
                    f"the tokenizer ({tok_src}) has {len(tok)} tokens but the merged model only {rows} "
                    "embedding rows; save the tokenizer used in training beside the adapter."
                )
            out = layout.candidate(base)
            with publish_dir(out) as tmp:
                merged.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            outs.append(out)
            rec["candidates"][base] = {"artefact": str(out), "tokenizer_from": str(tok_src), **mfacts}
            del merged
        rec.update(facts)
        rec.update(adapter=str(adapter.folder), dtype=dtype_name, working_dtype="float32")
    return outs
