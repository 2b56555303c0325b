"""Refuse an adapter/base pair the pipeline cannot merge, before anything is loaded or written.

:func:`check_adapter` reads only small files: both ``config.json`` / ``adapter_config.json``,
the safetensors headers (tensor names and shapes, no weights) and, for a base saved in
bitsandbytes 4-bit, the tiny JSON quant-state tensors that hold the unpacked shapes. It
raises :class:`~pipeline.errors.InputError` (exit code 2) with what is wrong and what to do.

Checked, in this order:

* adapter files: ``adapter_config.json`` present and valid JSON; ``adapter_model.safetensors``
  present and readable (a pickle ``adapter_model.bin`` only with ``adapter.allow_pickle``);
* PEFT type: only ``LORA`` (plain, rsLoRA, DoRA) can be folded into the weights;
* base: ``config.json`` present; no ``auto_map`` custom code unless ``base.trust_remote_code``;
  not quantized with anything but bitsandbytes 4-bit (an adapter fitted to GPTQ/AWQ weights);
* every adapter tensor against the base's tensors: the module exists; ``lora_A`` is
  ``[r, in_features]`` and ``lora_B`` is ``[out_features, r]`` of the base weight; full tensors
  (``modules_to_save``, saved embedding layers) have the base tensor's shape, except that
  ``embed_tokens`` / ``lm_head`` may differ in the vocabulary dimension (a resized vocabulary).

Hub ids (paths that do not exist locally) are not checked here; PEFT / transformers check them
when they load.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import AdapterFiles, Checkpoint, parse_adapter_key
from pipeline.errors import InputError

_VOCAB_MODULES = ("embed_tokens", "lm_head")


def _check_remote_code(base: Path, bcfg: dict, trust: bool) -> None:
    """Refuse custom modelling code (``auto_map``) not allowed by ``base.trust_remote_code``.
    A config whose ``model_type`` transformers implements itself loads without that code."""
    if "auto_map" not in bcfg or trust:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if bcfg.get("model_type") in CONFIG_MAPPING_NAMES:
        return
    raise InputError(
        f"base '{base}' needs its own modelling code (config.json auto_map: "
        f"{sorted(bcfg['auto_map'])}) and base.trust_remote_code is false. If you trust that code, "
        "set base.trust_remote_code: true in the config."
    )


def _check_quantization(base: Path, bcfg: dict) -> None:
    qc = bcfg.get("quantization_config")
    if qc is None or (qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")):
        return
    method = f"{qc.get('quant_method')}{' 8-bit' if qc.get('load_in_8bit') else ''}"
    raise InputError(
        f"base '{base}' is quantized with {method}, not bitsandbytes 4-bit; an adapter trained "
        "on it was fitted to those weights and cannot be merged by dequantizing. Point base.path at "
        "the full-precision or bitsandbytes 4-bit base the adapter was trained on (QLoRA)."
    )


def _check_shapes(adapter: dict[str, tuple], base: dict[str, tuple], tied: bool, fan_in_fan_out: bool) -> int | None:
    """Compare every adapter tensor with the base; return the resized vocabulary size or None."""
    if tied and "lm_head.weight" not in base:
        emb = [k for k in base if k.endswith("embed_tokens.weight")]
        if emb:
            base = {**base, "lm_head.weight": base[emb[0]]}
    modules = {k.rsplit(".", 1)[0] for k in base}
    modules |= {m.rsplit(".", i)[0] for m in list(modules) for i in range(1, m.count(".") + 1)}  # ancestors
    parsed = {k: parse_adapter_key(k) for k in adapter}
    embeddings = {t.module for t in parsed.values() if "embedding_" in t.name}
    resized: int | None = None

    def same(got: int, want: int, vocab_axis: bool) -> bool:
        nonlocal resized
        if got == want:
            return True
        if vocab_axis and resized in (None, got):
            resized = got
            return True
        return False

    def mismatch(key: str, got, base_key: str, want) -> InputError:
        return InputError(
            f"adapter tensor '{key}' has shape {list(got)}, which does not fit base tensor "
            f"'{base_key}' of shape {list(want)}: the adapter was trained on a different "
            "model (architecture or size). Use the base model the adapter was trained on."
        )

    for key, shape in adapter.items():
        t = parsed[key]
        if t.module not in modules:
            raise InputError(
                f"adapter tensor '{key}' targets module '{t.module}', which the base does not have: the "
                "adapter was trained on a different architecture. Use the base it was trained on."
            )
        vocab = t.module.rsplit(".", 1)[-1] in _VOCAB_MODULES
        if t.kind == "full":  # modules_to_save, or an embedding layer saved with the adapter
            want = base.get(t.target)
            if want is None:
                raise InputError(
                    f"adapter tensor '{key}' replaces '{t.target}', which the base does not have. "
                    "Use the base the adapter was trained on."
                )
            ok = len(shape) == len(want) and same(shape[0], want[0], vocab) and list(shape[1:]) == list(want[1:])
            if not ok:
                raise mismatch(key, shape, t.target, want)
            continue
        bkey = f"{t.module}.weight"
        want = base.get(bkey)
        if want is None or len(want) != 2 or t.kind in ("other", "tokens"):
            continue  # not a 2-D weight (or an adapter kind without a fixed shape rule): existence only
        transposed = t.module in embeddings or (fan_in_fan_out and not vocab)  # weight stored [in, out]
        out_f, in_f = (want[1], want[0]) if transposed else (want[0], want[1])
        if t.kind == "lora_A":
            ok = len(shape) == 2 and same(shape[1], in_f, vocab and transposed)
        elif t.kind == "lora_B":  # lora_B weight or bias, lora_embedding_B
            ok = same(shape[0], out_f, vocab and not transposed)
        else:  # DoRA magnitude: one entry per output feature
            ok = t.module in embeddings or list(shape) == [out_f]
        if not ok:
            raise mismatch(key, shape, bkey, want)
    for key, shape in adapter.items():  # rank of A and B must agree
        t = parsed[key]
        if t.kind == "lora_A":
            ab = "embedding_A" if "embedding_A" in t.name else "A"
            b_key = key.replace(f"lora_{ab}", f"lora_{ab.replace('A', 'B')}")
            if b_key in adapter and adapter[b_key][-1] != shape[0]:
                raise InputError(
                    f"adapter tensors '{key}' {list(shape)} and '{b_key}' {list(adapter[b_key])} disagree "
                    "on the LoRA rank: the adapter file is inconsistent. Re-save it with PEFT."
                )
    return resized


def check_adapter(cfg) -> dict:
    """Check that ``cfg.adapter`` can be merged into ``cfg.base`` by this pipeline.

    With ``adapter.combine`` every listed adapter is checked and the facts are returned as
    ``{"adapters": [facts, ...]}``, in the order of the config.

    Reads headers and configs only (no weights), so it is cheap to call at the start of a stage.

    Returns:
        Facts for the stage record: ``peft_type``, ``r``, ``lora_alpha``, ``use_rslora``,
        ``use_dora``, ``adapted_modules`` (base module names with LoRA A/B), ``modules_to_save``
        (modules whose full weights the adapter carries and replaces), ``trained_biases``
        (modules whose bias it carries: ``bias="all"/"lora_only"``), ``resized_vocab`` (the adapter's vocabulary size
        when it differs from the base's, else None). ``{}`` when the adapter is a hub id;
        without the shape facts when the base is a hub id or has no safetensors.
    Raises:
        InputError: a missing/invalid/corrupt adapter or base file, a pickle-only adapter without
            ``adapter.allow_pickle``, a PEFT type other than LoRA, custom base code without
            ``base.trust_remote_code``, a base quantized with anything but bitsandbytes 4-bit, or an
            adapter tensor whose module is not in the base or whose shape does not fit it. The
            message names the file or tensor (with both shapes) and says what to do.
    """
    paths = getattr(cfg.adapter, "paths", None) or [cfg.adapter.path]
    facts = [_check_one(p, cfg.base.path, cfg) for p in paths]
    return facts[0] if len(facts) == 1 else {"adapters": facts}


def _check_one(adapter_path: str, base_path: str, cfg) -> dict:
    if not Path(adapter_path).exists():
        return {}
    adapter = AdapterFiles(adapter_path, cfg.adapter.allow_pickle)
    acfg = adapter.config
    peft_type = acfg.get("peft_type")
    if peft_type != "LORA":
        raise InputError(
            f"adapter '{adapter.folder}' is of PEFT type '{peft_type}', which cannot be merged into the "
            "weights; only LoRA adapters (including rsLoRA and DoRA) can. Serve this adapter with PEFT "
            "unmerged, or train a LoRA adapter."
        )
    shapes = adapter.shapes
    if not shapes:
        raise InputError(
            f"adapter '{adapter.folder}' holds no tensors (empty target_modules?): it changes nothing to merge."
        )
    unknown = _check_lora_config(adapter.folder, acfg)
    _check_rank_and_targets(adapter.folder, acfg, shapes)
    changed = adapter.changed_modules()
    facts = {
        "peft_type": peft_type,
        "r": acfg.get("r"),
        "lora_alpha": acfg.get("lora_alpha"),
        "use_rslora": bool(acfg.get("use_rslora")),
        "use_dora": bool(acfg.get("use_dora")),
        "adapted_modules": changed["lora"],
        "modules_to_save": changed["full"],
        "trained_biases": changed["biases"],
        "trainable_tokens": changed["tokens"],
        "resized_vocab": None,
        "unknown_config_keys": unknown,
    }
    if not Path(base_path).exists():
        return facts
    base = Checkpoint(base_path)
    _check_remote_code(base.folder, base.config, cfg.base.trust_remote_code)
    _check_quantization(base.folder, base.config)
    if not base.files:
        return facts
    base_shapes = base.shapes()
    facts["resized_vocab"] = _check_shapes(shapes, base_shapes, base.tied, bool(acfg.get("fan_in_fan_out")))
    _check_lora_bias(adapter, base_shapes)
    _check_vocabulary(adapter, base, base_shapes, cfg)
    return facts


# Adapter forms whose merged model cannot equal the unmerged one, by design.
_UNMERGEABLE = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies the adapter only after its invocation tokens; "
    "merged weights would apply it everywhere",
    "layer_replication": "layer replication adds decoder layers that share base weights; the merged model "
    "would need a different architecture",
    "arrow_config": "Arrow routes each token among several LoRA experts at inference time",
}


def _check_lora_config(folder: Path, acfg: dict) -> list[str]:
    """Refuse LoRA forms that cannot be merged and configs PEFT would misread; return the keys the
    installed PEFT does not know (listed in the stage record and the report).

    Raises:
        InputError: an unmergeable form (named), no ``target_modules``/``target_parameters``, or an
            unknown key set to a value (the installed PEFT would ignore what it changes).
    """
    import dataclasses

    from peft import LoraConfig

    for key, why in _UNMERGEABLE.items():
        if acfg.get(key):
            raise InputError(
                f"adapter '{folder}' uses {key} ({why}): it cannot be folded into the weights. "
                "Serve it with PEFT unmerged."
            )
    if not acfg.get("target_modules") and not acfg.get("target_parameters"):
        raise InputError(
            f"adapter '{folder}': adapter_config.json has no target_modules (nor target_parameters), "
            "so PEFT cannot tell which modules the adapter's tensors belong to. Re-save the adapter with "
            "the LoraConfig it was trained with."
        )
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k in acfg if k not in known)
    changing = [k for k in unknown if acfg[k] not in (None, False, [], {}, "", 0)]
    if changing:
        import peft

        raise InputError(
            f"adapter '{folder}': adapter_config.json sets {changing}, unknown to the installed PEFT "
            f"{peft.__version__}; PEFT would ignore them and merge something else than what was "
            "trained. Use the PEFT version the adapter was trained with."
        )
    return unknown


def _check_rank_and_targets(folder: Path, acfg: dict, shapes: dict[str, tuple]) -> None:
    """Refuse a LoRA config that does not describe its own tensors, which PEFT would fail to build or
    load only after the base is dequantized: a rank that is not a positive integer, a ``lora_A`` whose
    rank is not the config's (``r``, or the ``rank_pattern`` entry PEFT's own
    ``get_pattern_key`` picks for the module; not for LoRA on parameters), or ``target_modules``
    that select none of the adapted modules (PEFT's own ``check_target_module_exists``, PEFT's
    own refusal; ``all-linear`` and ``target_parameters`` select by type at load time and are not
    checked here).

    Raises:
        InputError: naming the key or tensor, what the config says and what the tensors hold.
    """
    import dataclasses

    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    pattern = acfg.get("rank_pattern") or {}
    for key, v in [("r", acfg.get("r")), *((f"rank_pattern[{k!r}]", v) for k, v in pattern.items())]:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(
                f"adapter '{folder}': adapter_config.json has {key} = {v!r}; a LoRA rank is a positive "
                "integer. Re-save the adapter with the LoraConfig it was trained with."
            )
    lora = [parse_adapter_key(k) for k in shapes]
    for t, shape in zip(lora, shapes.values()):
        if t.kind != "lora_A" or len(shape) != 2 or acfg.get("target_parameters"):
            continue  # LoRA on parameters (MoE experts) stacks one rank block per expert
        want = pattern.get(get_pattern_key(list(pattern), t.module), acfg["r"]) if pattern else acfg["r"]
        if shape[0] != want:
            raise InputError(
                f"adapter '{folder}': tensor '{t.key}' has rank {shape[0]} but adapter_config.json gives "
                f"{want} for module '{t.module}' (r / rank_pattern): config and weights do not belong "
                "together. Use the adapter_config.json saved with these weights."
            )
    targets = acfg.get("target_modules")
    if not targets or acfg.get("target_parameters") or targets == "all-linear":
        return
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        config = LoraConfig(**{k: v for k, v in acfg.items() if k in known and k not in ("peft_type", "task_type")})
    except (TypeError, ValueError) as e:
        raise InputError(f"adapter '{folder}': adapter_config.json is not a valid LoraConfig: {e}") from None
    adapted = sorted({t.module for t in lora if t.kind in ("lora_A", "lora_B", "magnitude")})
    # PEFT also adapts modules it was not asked for by name (the tied head of a targeted embedding),
    # and refuses to load only when the targets select nothing: refused here in that case.
    if adapted and not any(check_target_module_exists(config, m) for m in adapted):
        raise InputError(
            f"adapter '{folder}': its weights adapt {adapted[:3]}{' ...' if len(adapted) > 3 else ''}, but "
            f"adapter_config.json's target_modules {targets!r} select none of them, so PEFT cannot load "
            "the adapter. Use the adapter_config.json saved with these weights."
        )


def _check_lora_bias(adapter: AdapterFiles, base_shapes: dict) -> None:
    """Refuse ``lora_bias=True`` LoRA biases on modules without a bias in the base.

    Raises:
        InputError: naming the first such module and the option.
    """
    for t in adapter.parsed:
        if t.kind == "lora_B" and t.name.endswith("lora_B.bias") or t.name.endswith("lora_B.default.bias"):
            if f"{t.module}.bias" not in base_shapes:
                raise InputError(
                    f"adapter '{adapter.folder}' was trained with lora_bias=True, which adds a bias to "
                    f"'{t.module}', but the base has no bias there: the merged checkpoint would need a "
                    "new bias the architecture does not have. Retrain with lora_bias=False, or merge into "
                    "a base whose layers have biases."
                )


def _check_vocabulary(adapter: AdapterFiles, base: Checkpoint, base_shapes: dict, cfg) -> None:
    """Refuse a vocabulary grown in training when the adapter holds no embedding rows for it.

    Raises:
        InputError: the tokenizer saved beside the adapter has more tokens than the base has rows,
            and the adapter carries neither embedding rows nor trainable tokens.
    """
    if not adapter.tokenizer_saved:
        return
    emb = [k for k in base_shapes if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")]
    if not emb:
        return
    rows = base_shapes[emb[0]][0]
    changed = adapter.changed_modules()
    module = emb[0].removesuffix(".weight")
    if adapter.embedding_rows(module) or changed["tokens"]:
        return
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(adapter.folder, trust_remote_code=cfg.base.trust_remote_code))
    if n > rows:
        raise InputError(
            f"adapter '{adapter.folder}': its tokenizer has {n} tokens but the base only {rows} embedding "
            f"rows, and the adapter holds no embedding rows: training resized the vocabulary but the "
            "new rows were not saved. Re-save the adapter with save_embedding_layers=True (or train with "
            "modules_to_save=['embed_tokens', 'lm_head'] or trainable_token_indices)."
        )
