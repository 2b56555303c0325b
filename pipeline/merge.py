"""Stage 2, merge: fold the LoRA adapter into the base weights, one tensor at a time.

For each merge base (``merge.base``: ``dequantized``, the weights the adapter was trained
against; ``original``, the full-precision checkpoint), every base parameter is read as
training loaded it (:class:`pipeline.bnb4.BaseTensors`: NF4/FP4 rebuilt per tensor exactly
as bitsandbytes built it), PEFT's own per-layer merge adds the adapter in float32
(:mod:`pipeline.lora`), and the result is cast once to the output dtype and written into
size-capped safetensors shards (``merged-<base>.unverified/``, published atomically). Peak
memory is a few of the largest tensors in float32 plus the adapter, never the model.

The verify stage checks each candidate against the model as PEFT runs it unmerged, built
without any of this code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import fingerprint
from pipeline.adapter_checks import check_adapter
from pipeline.bnb4 import BaseTensors
from pipeline.checkpoint import AdapterFiles, Checkpoint, ShardWriter
from pipeline.common import DTYPES, all_finite, log, publish_dir
from pipeline.errors import InputError
from pipeline.layout import MERGE_BASES
from pipeline.models import apply_runtime, load_tokenizer
from pipeline.records import stage_record


def candidates(cfg, base: Checkpoint) -> list[str]:
    """Merge bases to build: the configured one, plus the other when ``compare_bases`` and possible.

    Raises:
        InputError: ``merge.base: original`` with a base saved in 4-bit.
    """
    want = cfg.merge.base
    if want == "original" and base.is_bnb_4bit:
        raise InputError(
            "merge.base is 'original' but the base is a saved bnb 4-bit checkpoint: the full-precision "
            "weights are not there. Point base.path at the full-precision checkpoint, or use 'dequantized'."
        )
    if want != "auto" and not cfg.merge.compare_bases:
        return [want]
    return list(MERGE_BASES) if not base.is_bnb_4bit else ["dequantized"]


def _skeleton_with_adapter(cfg, config, adapter: AdapterFiles):
    """(PeftModel on a meta skeleton with the adapter attached, tied aliases, resized vocabulary or None)."""
    from pipeline.lora import attach_adapter, build_skeleton, tied_aliases

    probe = build_skeleton(config)
    emb = probe.get_input_embeddings()
    emb_name = next(n for n, m in probe.named_modules() if m is emb)
    rows = adapter.embedding_rows(emb_name)
    resized = rows if rows and rows != emb.weight.shape[0] else None
    skeleton = build_skeleton(config, **({"vocab_size": resized} if resized else {}))
    aliases = tied_aliases(skeleton)
    return attach_adapter(skeleton, adapter.folder), aliases, resized


def combine_adapters(cfg, config) -> Path:
    """Combine ``adapter.combine.adapters`` with PEFT's ``add_weighted_adapter`` (on a meta skeleton)
    into one LoRA adapter saved at ``adapter-combined/``; reference and merge both use it."""
    from pipeline.lora import add_weighted_adapter, attach_adapter, build_skeleton, load_more_adapter

    c = cfg.adapter.combine
    names = [f"a{i}" for i in range(len(c.adapters))]
    pm = attach_adapter(build_skeleton(config), c.adapters[0].path, adapter_name=names[0])
    for n, a in zip(names[1:], c.adapters[1:]):
        load_more_adapter(pm, a.path, n)
    torch.manual_seed(c.seed)  # DARE prunes at random
    kw = {"density": c.density} if c.density is not None else {}
    add_weighted_adapter(pm, names, [a.weight for a in c.adapters], "combined", combination_type=c.method, **kw)
    out = cfg.layout.combined_adapter
    with publish_dir(out) as tmp:
        pm.save_pretrained(tmp, selected_adapters=["combined"], save_embedding_layers=False)
        for f in (tmp / "combined").iterdir():  # PEFT writes non-default adapters into a subfolder
            f.rename(tmp / f.name)
        (tmp / "combined").rmdir()
    return out


def _cast_checked(name: str, t: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """``t`` cast once to the output dtype; inf/NaN refused, naming the tensor.

    Raises:
        InputError: the tensor holds inf/NaN after the cast (float16 overflow: suggests bfloat16).
    """
    out = t.to(DTYPES[dtype_name])
    if not all_finite(out):
        hint = (
            " Values above 65504 overflow float16: set dequantize.dtype: bfloat16." if dtype_name == "float16" else ""
        )
        raise InputError(f"merged weight '{name}' holds inf/NaN after the cast to {dtype_name}.{hint}")
    return out


def write_merged(
    pm, tensors: BaseTensors, aliases: dict[str, str], folder: Path, dtype_name: str, max_shard_bytes: int
) -> dict:
    """Merge every module of ``pm`` over ``tensors`` and write the result, cast to ``dtype_name``,
    as safetensors shards in ``folder``.

    Returns:
        ``{"tied": bool or None (no tied pair), "tensors": n, "bytes": n}``.
    Raises:
        InputError: a base tensor whose shape the model does not expect (a vocabulary resized in
            training without its rows in the adapter), or inf/NaN after the cast.
    """
    from pipeline.lora import iter_merged, resolve_tie

    def load(name: str) -> torch.Tensor:
        return tensors.get(aliases.get(name, name)).cpu()

    def load_plain(name: str) -> torch.Tensor:  # kept as is by the merge: read straight in the output dtype
        return tensors.get(aliases.get(name, name), DTYPES[dtype_name]).cpu()

    expected = dict(pm.base_model.model.named_parameters(remove_duplicate=False))
    writer = ShardWriter(folder, max_shard_bytes)
    held: dict[str, torch.Tensor] = {}
    tied = None
    try:
        for name, t in iter_merged(pm, load, load_plain):
            if name in expected and tuple(expected[name].shape) != tuple(t.shape):
                raise ValueError(
                    f"base tensor '{name}' has shape {list(t.shape)}, the model expects {list(expected[name].shape)}"
                )
            pair = next(((d, s) for d, s in aliases.items() if name in (d, s)), None)
            out = _cast_checked(name, t, dtype_name)
            del t
            if pair is None:
                for key, piece in tensors.checkpoint_pieces(name, out):
                    writer.add(key, piece)
                del out, piece  # not held while the next module merges
                continue
            held[name] = out  # one side of a tied pair: decide once both are merged
            dup, src = pair
            if dup in held and src in held:
                tied = resolve_tie(held[src], held[dup])
                writer.add(src, held.pop(src))
                dup_t = held.pop(dup)
                if not tied:
                    writer.add(dup, dup_t)
    except ValueError as e:
        raise InputError(
            f"{e}: training resized the vocabulary but the adapter holds no rows for this tensor. Re-save "
            "the adapter with save_embedding_layers=True (or modules_to_save / trainable_token_indices)."
        ) from None
    writer.finish()
    return {"tied": tied, "bytes": writer.total_bytes}


def _generation_settings(base_dir: Path, tok, config) -> dict:
    """Generation settings that follow the tokenizer training saved: the base's ``eos_token_id`` is
    kept and the training tokenizer's EOS added (a list); ``bos``/``pad`` follow the training
    tokenizer. The base's sampling settings are kept. Returns the ``GenerationConfig`` to save
    and the ids applied to ``config``."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    changes = {}
    old = gen.eos_token_id if gen.eos_token_id is not None else config.eos_token_id
    old = [] if old is None else ([old] if isinstance(old, int) else list(old))
    if tok.eos_token_id is not None and tok.eos_token_id not in old:
        eos = old + [tok.eos_token_id]
        changes["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    for key in ("bos_token_id", "pad_token_id"):
        new = getattr(tok, key)
        if new is not None and new != getattr(gen, key, None):
            changes[key] = new
    for k, v in changes.items():
        setattr(gen, k, v)
        setattr(config, k, v)
    return {"generation_config": gen, "changes": changes}


def _save_metadata(folder: Path, config, dtype_name: str, tied, resized, tok, base_dir: Path) -> dict:
    """``config.json`` (output dtype, no quantization_config, the tie, the vocabulary),
    ``generation_config.json`` and the tokenizer, beside the shards."""
    config = type(config).from_dict(config.to_dict())
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype_name
    if tied is not None:
        config.tie_word_embeddings = tied
        if getattr(config, "text_config", None) is not None:
            config.text_config.tie_word_embeddings = tied
    if resized:
        config.vocab_size = resized
    gen = _generation_settings(base_dir, tok, config)
    config.save_pretrained(folder)
    gen["generation_config"].save_pretrained(folder)
    tok.save_pretrained(folder)
    return gen["changes"]


def run(cfg) -> list[Path]:
    """Stage entry: merge the adapter into each merge base; returns the ``merged-<base>.unverified`` folders.

    Raises:
        InputError: an unmergeable adapter, a vocabulary resized without its rows, a tokenizer larger
            than the merged embeddings, inf/NaN weights after the cast (float16 overflow).
    """
    from transformers import AutoConfig

    layout = cfg.layout
    with stage_record(layout, "merge", fingerprint.inputs(cfg, "merge")) as rec:
        facts = check_adapter(cfg)
        device = apply_runtime(cfg.runtime)
        base = Checkpoint(cfg.base.path)
        config = AutoConfig.from_pretrained(base.folder, trust_remote_code=cfg.base.trust_remote_code)
        if cfg.adapter.combine:
            log(f"merge: combining {len(cfg.adapter.combine.adapters)} adapters ({cfg.adapter.combine.method})")
            combine_adapters(cfg, config)
        adapter = AdapterFiles(cfg.effective_adapter, cfg.adapter.allow_pickle)
        pm, aliases, resized = _skeleton_with_adapter(cfg, config, adapter)
        tok_src = next(
            (
                Path(p)
                for p in (adapter.folder, *cfg.adapter.paths)
                if Path(p).is_dir() and AdapterFiles(p, cfg.adapter.allow_pickle).tokenizer_saved
            ),
            base.folder,
        )
        tok = load_tokenizer(tok_src, cfg)
        rows = resized or pm.base_model.model.get_input_embeddings().weight.shape[0]
        if len(tok) > rows:
            raise InputError(
                f"the tokenizer ({tok_src}) has {len(tok)} tokens but the merged model only {rows} "
                "embedding rows: training resized the vocabulary, but the adapter holds no embedding "
                "rows. Re-save it with save_embedding_layers=True (or modules_to_save / "
                "trainable_token_indices)."
            )
        dtype_name = cfg.out_dtype
        outs, rec["candidates"] = [], {}
        for merge_base in candidates(cfg, base):
            tensors = BaseTensors(base, cfg, source=merge_base, device=device)
            out = layout.candidate(merge_base)
            log(
                f"merge: adapter '{adapter.folder}' into the {merge_base} weights of '{base.folder}', one tensor at a "
                f"time, float32 -> {dtype_name}"
            )
            with publish_dir(out) as tmp:
                written = write_merged(pm, tensors, aliases, tmp, dtype_name, int(cfg.runtime.shard_size_gb * 1e9))
                gen = _save_metadata(tmp, config, dtype_name, written["tied"], resized, tok, base.folder)
            outs.append(out)
            rec["candidates"][merge_base] = {
                "artefact": str(out),
                "tokenizer_from": str(tok_src),
                "tied": written["tied"],
                "bytes": written["bytes"],
                "generation_changes": gen,
            }
        rec.update(facts)
        rec.update(
            adapter=str(adapter.folder),
            dtype=dtype_name,
            working_dtype="float32",
            resized_vocab=resized,
            device=device,
            streamed=True,
        )
    return outs
