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

import json
import re
from pathlib import Path

from pipeline.errors import InputError

_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B|embedding_A|embedding_B)(?:\.(?P<part>weight|bias))?$")
_MAGNITUDE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.weight)?$")
_OTHER_ADAPTER = re.compile(r"^(?P<mod>.+?)\.(?:lora_\w+|token_adapter)\b")
_WRAPPERS = re.compile(r"\.(?:modules_to_save|original_module)(?:\.default)?(?=\.)|\.base_layer(?=\.)")
_VOCAB_MODULES = ("embed_tokens", "lm_head")


def _read_json(f: Path, what_to_do: str) -> dict:
    if not f.is_file():
        raise InputError(f"'{f}' is missing. {what_to_do}")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"'{f}' is not valid JSON ({e}). {what_to_do}") from None
    if not isinstance(data, dict):
        raise InputError(f"'{f}' must hold a JSON object. {what_to_do}")
    return data


def _safetensors_shapes(files: list[Path], bnb_shapes: bool = False) -> dict[str, list[int]]:
    """Tensor name -> shape from safetensors headers. With ``bnb_shapes``, a bitsandbytes 4-bit
    weight (stored packed as ``[n, 1]`` uint8) gets its real ``[out, in]`` from its quant state."""
    from safetensors import safe_open
    shapes: dict[str, list[int]] = {}
    for f in files:
        try:
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    shapes[k] = list(h.get_slice(k).get_shape())
                    if bnb_shapes and re.search(r"\.quant_state\.bitsandbytes__\w+$", k):
                        state = json.loads(bytes(h.get_tensor(k).tolist()))
                        shapes[k.split(".quant_state.")[0]] = list(state["shape"])
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise InputError(f"'{f}' is not a readable safetensors file ({type(e).__name__}: {e}). "
                             "Re-download or re-save it.") from None
    return shapes


def _adapter_shapes(folder: Path, allow_pickle: bool) -> dict[str, list[int]]:
    st, pkl = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        return _safetensors_shapes([st])
    if not pkl.is_file():
        raise InputError(f"adapter '{folder}' has no adapter_model.safetensors (nor adapter_model.bin); "
                         "point adapter.path at the folder PEFT's save_pretrained wrote.")
    if not allow_pickle:
        raise InputError(f"adapter '{folder}' has only a pickle adapter_model.bin, refused: unpickling can run "
                         "arbitrary code. Convert it: sd = torch.load('adapter_model.bin', weights_only=True); "
                         "safetensors.torch.save_file(sd, 'adapter_model.safetensors'); or, if you trust the "
                         "file, set adapter.allow_pickle: true.")
    import torch
    try:
        sd = torch.load(pkl, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"'{pkl}' could not be read ({type(e).__name__}: {e}).") from None
    return {k: list(v.shape) for k, v in sd.items()}


def _base_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "Re-save the base checkpoint.").get("weight_map", {})
        return [folder / f for f in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def _check_remote_code(base: Path, bcfg: dict, trust: bool) -> None:
    """Refuse custom modelling code (``auto_map``) not allowed by ``base.trust_remote_code``.
    A config whose ``model_type`` transformers implements itself loads without that code."""
    if "auto_map" not in bcfg or trust:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    if bcfg.get("model_type") in CONFIG_MAPPING_NAMES:
        return
    raise InputError(f"base '{base}' needs its own modelling code (config.json auto_map: "
                     f"{sorted(bcfg['auto_map'])}) and base.trust_remote_code is false. If you trust that code, "
                     "set base.trust_remote_code: true in the config.")


def _check_quantization(base: Path, bcfg: dict) -> None:
    qc = bcfg.get("quantization_config")
    if qc is None or (qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")):
        return
    method = f"{qc.get('quant_method')}{' 8-bit' if qc.get('load_in_8bit') else ''}"
    raise InputError(f"base '{base}' is quantized with {method}, not bitsandbytes 4-bit; an adapter trained "
                     "on it was fitted to those weights and cannot be merged by dequantizing. Point base.path at "
                     "the full-precision or bitsandbytes 4-bit base the adapter was trained on (QLoRA).")


def _check_shapes(adapter: dict[str, list[int]], base: dict[str, list[int]], tied: bool,
                  fan_in_fan_out: bool) -> int | None:
    """Compare every adapter tensor with the base; return the resized vocabulary size or None."""
    if tied and "lm_head.weight" not in base:
        emb = [k for k in base if k.endswith("embed_tokens.weight")]
        if emb:
            base = {**base, "lm_head.weight": base[emb[0]]}
    modules = {k.rsplit(".", 1)[0] for k in base}
    embeddings = {m.group("mod") for k in adapter if (m := _LORA.match(k.removeprefix(_PREFIX)))
                  and m.group("ab").startswith("embedding")}
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
        return InputError(f"adapter tensor '{key}' has shape {list(got)}, which does not fit base tensor "
                          f"'{base_key}' of shape {list(want)}: the adapter was trained on a different "
                          "model (architecture or size). Use the base model the adapter was trained on.")

    for key, shape in adapter.items():
        name = key.removeprefix(_PREFIX)
        m = _LORA.match(name) or _MAGNITUDE.match(name) or _OTHER_ADAPTER.match(name)
        mod = m.group("mod") if m else _WRAPPERS.sub("", name).rsplit(".", 1)[0]
        if mod not in modules:
            raise InputError(f"adapter tensor '{key}' targets module '{mod}', which the base does not have: the "
                             "adapter was trained on a different architecture. Use the base it was trained on.")
        vocab = mod.rsplit(".", 1)[-1] in _VOCAB_MODULES
        if not m:  # a full tensor: modules_to_save, or an embedding layer saved with the adapter
            bkey = _WRAPPERS.sub("", name)
            want = base.get(bkey)
            if want is None:
                raise InputError(f"adapter tensor '{key}' replaces '{bkey}', which the base does not have. "
                                 "Use the base the adapter was trained on.")
            ok = len(shape) == len(want) and same(shape[0], want[0], vocab) and shape[1:] == want[1:]
            if not ok:
                raise mismatch(key, shape, bkey, want)
            continue
        bkey = f"{mod}.weight"
        want = base.get(bkey)
        if want is None or len(want) != 2 or m.re is _OTHER_ADAPTER:
            continue  # not a 2-D weight (or an adapter kind without a fixed shape rule): existence only
        transposed = mod in embeddings or (fan_in_fan_out and not vocab)  # weight stored [in, out]
        out_f, in_f = (want[1], want[0]) if transposed else (want[0], want[1])
        ab = m.groupdict().get("ab")
        if ab in ("A", "embedding_A") and m.group("part") != "bias":
            ok = len(shape) == 2 and same(shape[1], in_f, vocab and transposed)
        elif ab is not None:  # lora_B weight or bias, lora_embedding_B
            ok = same(shape[0], out_f, vocab and not transposed)
        else:  # DoRA magnitude: one entry per output feature
            ok = mod in embeddings or shape == [out_f]
        if not ok:
            raise mismatch(key, shape, bkey, want)
    for key, shape in adapter.items():  # rank of A and B must agree
        if (m := _LORA.match(key.removeprefix(_PREFIX))) and m.group("ab") in ("A", "embedding_A"):
            b_key = key.replace(f"lora_{m.group('ab')}", f"lora_{m.group('ab').replace('A', 'B')}")
            if b_key in adapter and adapter[b_key][-1] != shape[0]:
                raise InputError(f"adapter tensors '{key}' {shape} and '{b_key}' {adapter[b_key]} disagree on "
                                 "the LoRA rank: the adapter file is inconsistent. Re-save it with PEFT.")
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
    facts = [_check_one(Path(p), Path(cfg.base.path), cfg) for p in paths]
    return facts[0] if len(facts) == 1 else {"adapters": facts}


def _check_one(adir: Path, bdir: Path, cfg) -> dict:
    if not adir.exists():
        return {}
    acfg = _read_json(adir / "adapter_config.json",
                      "adapter.path must be the folder PEFT's save_pretrained wrote (adapter_config.json + weights).")
    peft_type = acfg.get("peft_type")
    if peft_type != "LORA":
        raise InputError(f"adapter '{adir}' is of PEFT type '{peft_type}', which cannot be merged into the weights; "
                         "only LoRA adapters (including rsLoRA and DoRA) can. Serve this adapter with PEFT unmerged, "
                         "or train a LoRA adapter.")
    shapes = _adapter_shapes(adir, cfg.adapter.allow_pickle)
    adapted = sorted({m.group("mod") for k in shapes if (m := _LORA.match(k.removeprefix(_PREFIX)))})
    full = [_WRAPPERS.sub("", n) for k in shapes if not (_LORA.match(n := k.removeprefix(_PREFIX))
                                                        or _MAGNITUDE.match(n) or _OTHER_ADAPTER.match(n))]
    if not shapes:
        raise InputError(f"adapter '{adir}' holds no tensors (empty target_modules?): it changes nothing to merge.")
    facts = {"peft_type": peft_type, "r": acfg.get("r"), "lora_alpha": acfg.get("lora_alpha"),
             "use_rslora": bool(acfg.get("use_rslora")), "use_dora": bool(acfg.get("use_dora")),
             "adapted_modules": adapted,
             "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in full if not n.endswith(".bias")}),
             "trained_biases": sorted({n.rsplit(".", 1)[0] for n in full if n.endswith(".bias")}),
             "resized_vocab": None}
    if not bdir.exists():
        return facts
    bcfg = _read_json(bdir / "config.json", "base.path must be a Hugging Face checkpoint folder.")
    _check_remote_code(bdir, bcfg, cfg.base.trust_remote_code)
    _check_quantization(bdir, bcfg)
    files = _base_files(bdir)
    if not files:
        return facts  # a pickle-only base: transformers decides; shapes are checked when PEFT loads
    base_shapes = _safetensors_shapes(files, bnb_shapes=bcfg.get("quantization_config") is not None)
    tied = bcfg.get("tie_word_embeddings", (bcfg.get("text_config") or {}).get("tie_word_embeddings", True))
    facts["resized_vocab"] = _check_shapes(shapes, base_shapes, tied, bool(acfg.get("fan_in_fan_out")))
    return facts
