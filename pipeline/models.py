"""Loading models: the one ``from_pretrained`` path, the 4-bit base as QLoRA training loaded it,
and the reference model (the 4-bit base with the adapter applied unmerged, as PEFT runs it).

Every model the pipeline loads goes through :func:`load_causal_lm`, which passes
``trust_remote_code`` and the device the same way every time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.common import DTYPES, log, release_freed_memory
from pipeline.errors import InputError


def pick_device(runtime) -> str:
    """The device of ``runtime.device``: ``cuda`` when asked for or available under ``auto``, else ``cpu``.

    Raises:
        InputError: ``cuda`` asked for but no CUDA device is visible.
    """
    want = runtime.device
    if want == "cuda" and not torch.cuda.is_available():
        raise InputError("runtime.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'.")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def apply_runtime(runtime) -> str:
    """Apply ``runtime`` to this process (torch CPU threads); returns the device to use."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    return pick_device(runtime)


def scoring_dtype(stored: str, device: str) -> torch.dtype:
    """dtype to run a checkpoint stored in ``stored`` in, for scoring: float32 on CPU
    (half-precision matmuls are slow there and the upcast of the weights is exact), the
    stored dtype on GPU."""
    return torch.float32 if device == "cpu" else DTYPES[stored]


def load_causal_lm(path, cfg, *, device: str = "cpu", dtype=None, quantization_config=None, **kwargs):
    """``from_pretrained`` the way every stage calls it: ``trust_remote_code`` from
    ``base.trust_remote_code``, all weights on ``device``, eval mode.

    A local safetensors checkpoint is read with ``pread`` (safetensors' ``pread`` backend, the
    slices handed to ``from_pretrained`` as its ``state_dict``), not memory-mapped: a memory map
    stays open while any tensor still points into it (a tied embedding kept in its stored dtype
    does), and every page of it touched during loading counts in the process's resident memory.
    With ``pread`` the process holds the model's tensors and nothing else (a 262144-token tied
    embedding model: 0.3 GiB less per loaded model; ``make bench-vocab``). The logits are the
    memory-mapped load's (``tests/test_models_load.py``). Hub ids, GGUF files, remote code,
    checkpoints saved quantized (GPTQ, bitsandbytes) and ``.bin`` checkpoints load the ordinary way.

    Args:
        path: local folder or hub id. dtype: a ``torch.dtype``, or None for the checkpoint's own.
    """
    from transformers import AutoModelForCausalLM

    common = {
        "dtype": dtype or "auto",
        "device_map": {"": device},
        **({"quantization_config": quantization_config} if quantization_config is not None else {}),
        **kwargs,
    }
    files = _local_safetensors(path) if "gguf_file" not in kwargs else None
    cls, config = _causal_lm_class(path, cfg) if files else (None, None)
    if cls is None or (dtype is None and getattr(config, "dtype", None) is None):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=cfg.base.trust_remote_code, **common)
        release_freed_memory()
        return model.eval()
    from contextlib import ExitStack

    from safetensors import safe_open

    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt", device="cpu", backend="pread")) for f in files]
        state = {k: h.get_slice(k) for h in handles for k in h.keys()}
        if dtype == torch.float32 and quantization_config is None:
            _upcast_while_reading(state, files)
        model = cls.from_pretrained(None, config=config, state_dict=state, **common)
        del state
    release_freed_memory()
    return model.eval()


def _upcast_while_reading(state: dict, files: list[str]) -> None:
    """Replace each 16-bit slice of ``state`` by its tensor read as float32, converted 64 MB at a
    time as it is read (:func:`pipeline.checkpoint.read_tensor`): the stored copy of a large
    tensor and its float32 copy are never whole together (a 262144 x 640 bf16 embedding: 0.34 GB
    less at the peak). ``from_pretrained`` keeps float32 tensors as they are when asked for float32,
    and the conversion is exact."""
    from pipeline.checkpoint import _header, read_tensor

    cache: dict = {}
    for f in files:
        header, _ = _header(Path(f), cache)
        for k, meta in header.items():
            if k != "__metadata__" and meta["dtype"] in ("F16", "BF16") and k in state:
                state[k] = read_tensor(Path(f), k, cache, dtype=torch.float32)


def _local_safetensors(path) -> list[str] | None:
    """The safetensors files of a local checkpoint folder (its index's shards, or
    ``model.safetensors``), or None (a hub id, a ``.bin`` checkpoint)."""
    import json

    folder = Path(path)
    if not folder.is_dir():
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [str(folder / f) for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [str(single)] if single.is_file() else None


def _causal_lm_class(path, cfg):
    """(the ``transformers`` causal-LM class of the checkpoint at ``path``, its config), or
    (None, None) where that class is not a built-in one (remote code) or the checkpoint is saved
    quantized (a GPTQ checkpoint's reload check loads it the way users do)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.base.trust_remote_code)
    if getattr(config, "auto_map", None) and cfg.base.trust_remote_code:
        return None, None
    if getattr(config, "quantization_config", None):  # a saved GPTQ/bnb checkpoint: as users load it
        return None, None
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], config
    except KeyError:
        return None, None


def load_tokenizer(path, cfg):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.base.trust_remote_code)


def bnb_config(dq, compute_dtype: str | None = None):
    """The ``BitsAndBytesConfig`` of QLoRA training from the ``dequantize`` section ``dq``:
    ``bnb_4bit_quant_type``, double quantization, compute dtype, ``quant_storage``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=dq.quant_type,
        bnb_4bit_use_double_quant=dq.double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype or dq.compute_dtype],
        bnb_4bit_quant_storage=getattr(torch, dq.quant_storage),
    )


def disable_bnb_cpu_repacking(model) -> None:
    """Keep bitsandbytes' AVX512-BF16 CPU inference kernel off on every ``Linear4bit`` of ``model``.

    That kernel (bitsandbytes 0.50, eval-mode forwards) repacks the weight in place and
    computes in bf16 whatever the compute dtype; training-mode forwards dequantize and matmul
    in the compute dtype. With it off, the model computes as in training and its weights stay
    exact for :func:`pipeline.bnb4.check_not_repacked`.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def load_4bit_base(cfg, device: str):
    """The base model in 4-bit exactly as QLoRA training loaded it.

    A full-precision checkpoint is quantized on load with :func:`bnb_config`; a checkpoint
    saved in bitsandbytes 4-bit is loaded with its own quant state. Non-quantized modules
    (embeddings, norms, ``lm_head``) are loaded in the compute dtype, as QLoRA training
    scripts do (``torch_dtype=bnb_4bit_compute_dtype``).

    Returns:
        ``transformers`` causal LM whose quantized linears are ``bnb.nn.Linear4bit``.
    Raises:
        InputError: the base is quantized with something other than bitsandbytes 4-bit.
    """
    from pipeline.checkpoint import read_config

    qc = read_config(cfg.base.path).get("quantization_config")
    kwargs: dict = {}
    if qc is None:
        kwargs["quantization_config"] = bnb_config(cfg.dequantize)
    elif qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise InputError(
            f"base '{cfg.base.path}' is quantized with '{qc.get('quant_method')}', not bitsandbytes 4-bit; "
            "QLoRA merging needs the bnb 4-bit or the full-precision base the adapter was trained on."
        )
    else:
        log(
            f"base is a saved bnb 4-bit checkpoint ({qc.get('bnb_4bit_quant_type')}, "
            f"double quant {qc.get('bnb_4bit_use_double_quant')}); its own quant state is used"
        )
    compute = str((qc or {}).get("bnb_4bit_compute_dtype") or cfg.dequantize.compute_dtype).removeprefix("torch.")
    model = load_causal_lm(cfg.base.path, cfg, device=device, dtype=DTYPES[compute], **kwargs)
    disable_bnb_cpu_repacking(model)
    return model


def reference_model(cfg, adapter: str | Path, device: str):
    """The reference: the model as training and PEFT inference run it, independent of the merge code.

    The base is loaded fresh in 4-bit with the training ``BitsAndBytesConfig``
    (:func:`load_4bit_base`); its vocabulary is resized only where training resized it (the
    adapter carries embedding rows of another count, as ``resize_token_embeddings(len(tokenizer))``
    before training leaves them); then ``PeftModel.from_pretrained`` and nothing else. Tied
    embeddings stay tied, as in training: PEFT itself decides how its adapters use them.

    Returns:
        ``peft.PeftModel`` in eval mode.
    """
    from peft import PeftModel
    from pipeline.checkpoint import AdapterFiles

    base = load_4bit_base(cfg, device)
    emb = base.get_input_embeddings()
    name = next(n for n, m in base.named_modules() if m is emb)
    rows = AdapterFiles(adapter, cfg.adapter.allow_pickle).embedding_rows(name)
    if rows and rows != emb.weight.shape[0]:
        base.resize_token_embeddings(rows, mean_resizing=False)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def lora_bytes(model) -> int:
    """Bytes of a PEFT model's adapter parameters (``lora_*``)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def layerwise_wanted(cfg, params: int) -> bool:
    """Whether to score one decoder layer at a time (``runtime.offload``): ``on``, ``off``, or under
    ``auto`` when the reference plus one variant in float32 (about 4.5 bytes per parameter) would
    take more than half of the memory available now."""
    if cfg.runtime.offload != "auto":
        return cfg.runtime.offload == "on"
    import psutil

    return 4.5 * params > 0.5 * psutil.virtual_memory().available


def reference_source(cfg, adapter, device: str, layerwise: bool):
    """The reference as a scoring source: the whole model (:func:`reference_model`) or, one
    decoder layer at a time, :func:`pipeline.layerwise.reference_lm` (equal on the tiny models:
    ``tests/test_layerwise.py``)."""
    if layerwise:
        from pipeline.layerwise import reference_lm

        return reference_lm(cfg, adapter, device)
    return reference_model(cfg, adapter, device)


def checkpoint_source(path, cfg, device: str, dtype, layerwise: bool):
    """An ordinary checkpoint as a scoring source, whole or one decoder layer at a time, in ``dtype``."""
    if layerwise:
        from pipeline.layerwise import plain_lm

        return plain_lm(path, cfg, dtype, device)
    return load_causal_lm(path, cfg, device=device, dtype=dtype)


def unmerged_original_source(cfg, adapter, device: str, layerwise: bool):
    """The full-precision base with the adapter applied unmerged by PEFT (float32): the
    ``original`` merge candidate's own unmerged model."""
    from peft import PeftModel

    from pipeline.checkpoint import AdapterFiles

    if layerwise:
        from pipeline.layerwise import unmerged_lm

        return unmerged_lm(cfg, adapter, device)
    model = load_causal_lm(cfg.base.path, cfg, device=device, dtype=torch.float32)
    emb = model.get_input_embeddings()
    rows = AdapterFiles(adapter, cfg.adapter.allow_pickle).embedding_rows(
        next(n for n, m in model.named_modules() if m is emb)
    )
    if rows and rows != emb.weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def gptq_source(path, cfg, device: str, layerwise: bool = False):
    """A GPTQ checkpoint as a scoring source. On GPU: reloaded with plain ``transformers`` (its GPTQ
    kernel). On CPU: a float32 model holding each quantized weight dequantized once from
    ``qweight``/``qzeros``/``scales``/``g_idx`` (:class:`pipeline.gptq.GPTQTensors`), equal to the
    torch GPTQ kernel's weights and many times faster than the CPU kernels (``tests/test_gptq.py``)."""
    if device == "cuda":
        return load_causal_lm(path, cfg, device=device)
    from pipeline.gptq import GPTQTensors
    from pipeline.layerwise import LayerwiseLM, PlainFiller, materialize, skeleton
    from pipeline.lora import tied_aliases

    tensors = GPTQTensors(path)
    config = tensors.config()
    model = skeleton(config).eval()
    filler = PlainFiller(tensors, torch.float32, device, tied_aliases(model))
    if layerwise:
        return LayerwiseLM(model, filler, config.get_text_config().vocab_size, device)
    return materialize(model, filler)
