"""Running a causal LM one decoder layer at a time, for models larger than memory.

As the GPTQ reference implementation's sequential evaluation (IST-DASLab ``llama.py``:
``llama_eval``) does: capture the inputs of decoder layer 0 for a chunk of windows, run each
layer alone on them (its weights materialized from disk, then released), and feed its outputs
to the next layer; finally the model's own head (final norm, ``lm_head``) turns the last hidden
states into logits. Nothing ever holds more than one decoder layer, the head, and the
activations of one chunk of windows.

The model is a skeleton (parameters on the meta device, buffers real) of any architecture
whose decoder layers form one ``nn.ModuleList``; a *filler* materializes a module's parameters
on demand (:class:`PlainFiller` for an ordinary checkpoint, :class:`FourBitFiller` for the
4-bit base with an adapter, as training ran it). The result equals the whole-model forward
(``tests/test_layerwise.py``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def logprobs_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax of fresh logits ``[T, V]`` as float32 on the CPU, in place where the logits already
    are, with the exponentials 16 rows at a time (a 262144-token vocabulary makes a whole buffer 0.5 GB
    at 512 tokens).

    ``x - logsumexp(x)`` with ``logsumexp`` computed as ``torch.logsumexp`` does (row max, infinite
    maxima taken as 0, ``log(sum(exp(x - max))) + max``) but with the exponentials in place: the
    result equals ``x - torch.logsumexp(x, -1, keepdim=True)`` bit for bit
    (``tests/test_blocks.py``)."""
    logp = logits.float().cpu()
    del logits
    maxes = logp.amax(-1, keepdim=True)
    maxes.masked_fill_(maxes.abs() == float("inf"), 0.0)
    sums = torch.empty_like(maxes)
    for i in range(0, logp.shape[0], 16):  # the exponentials of 16 rows at a time (row-wise: same sums)
        sums[i : i + 16] = (logp[i : i + 16] - maxes[i : i + 16]).exp_().sum(-1, keepdim=True)
    return logp.sub_(sums.log_().add_(maxes))


def skeleton(config, **overrides) -> nn.Module:
    """The causal LM of ``config`` with parameters on the meta device and buffers (rotary
    frequencies) real on the CPU; ``overrides`` set config attributes (``vocab_size``)."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    for k, v in overrides.items():
        setattr(config, k, v)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # accelerate's meta registration breaks the ties made at init
    return model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the decoder layers: the longest ``nn.ModuleList`` of modules of one class.

    Raises:
        ValueError: the model has no such list.
    """
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers to run one at a time")
    return best


def base_name(name: str) -> str:
    """A parameter name of a PEFT-wrapped model as the base checkpoint names it."""
    name = name.removeprefix("base_model.model.")
    for part in (".base_layer", ".original_module"):
        name = name.replace(part, "")
    return name


class PlainFiller:
    """Materializes parameters from a tensor source (``get(name, dtype)``, e.g.
    :class:`pipeline.bnb4.BaseTensors`) in ``dtype``; parameters that are already real (adapter
    tensors) are left alone."""

    def __init__(self, tensors, dtype: torch.dtype = torch.float32, device: str = "cpu", aliases=None):
        self.tensors, self.dtype, self.device = tensors, dtype, device
        self.aliases = aliases or {}

    def tensor(self, name: str) -> torch.Tensor:
        name = base_name(name)
        return self.tensors.get(self.aliases.get(name, name), self.dtype).to(self.device)

    def make(self, module: nn.Module, pname: str, full: str, old: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(self.tensor(full), requires_grad=False)

    @contextlib.contextmanager
    def filled(self, module: nn.Module, prefix: str):
        """Real parameters in every meta parameter under ``module`` while the block runs."""
        swapped = []
        try:
            for mname, sub in module.named_modules():
                for pname, p in list(sub._parameters.items()):
                    if p is None or p.device.type != "meta":
                        continue
                    full = ".".join(x for x in (prefix, mname, pname) if x)
                    sub._parameters[pname] = self.make(sub, pname, full, p)
                    swapped.append((sub, pname, p))
            yield
        finally:
            for sub, pname, p in swapped:
                sub._parameters[pname] = p


class FourBitFiller(PlainFiller):
    """Materializes the 4-bit base as ``from_pretrained(quantization_config=...)`` builds it:
    each ``Linear4bit`` weight becomes ``Params4bit(ckpt.to(load_dtype), **meta_attributes)``
    quantized by bitsandbytes on ``.to(device)`` (a base saved in 4-bit: its stored quant state),
    with bnb's CPU repacking kernel off; everything else as :class:`PlainFiller` in the load dtype."""

    def make(self, module, pname, full, old):
        import bitsandbytes as bnb

        if isinstance(module, bnb.nn.Linear4bit) and pname == "weight":
            module.support_avx512bf16_for_cpu = False
            return self.tensors.params4bit(base_name(full), old, self.device)
        return nn.Parameter(self.tensor(full), requires_grad=False)


def materialize(model: nn.Module, filler) -> nn.Module:
    """Fill every meta parameter of ``model`` for good (a whole model from a tensor source); ties kept."""
    done: dict[int, nn.Parameter] = {}
    for mname, sub in model.named_modules():
        for pname, p in list(sub._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in done:
                done[id(p)] = filler.make(sub, pname, f"{mname}.{pname}" if mname else pname, p)
            sub._parameters[pname] = done[id(p)]
    return model.eval()


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records its inputs and stops the forward."""

    def __init__(self):
        super().__init__()
        self.args = self.kwargs = None

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        raise _Captured


class _Replay(nn.Module):
    """Stands in for a decoder layer in the head pass: layer 0 returns the stored last hidden
    states; the others pass their input through."""

    def __init__(self, hidden=None, as_tuple: bool = False):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = self.hidden if self.hidden is not None else hidden_states
        return (out,) if self.as_tuple else out


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.base_model.model if hasattr(model, "base_model") and hasattr(model, "peft_config") else model


def _outside(model: nn.Module, layers: nn.ModuleList, exclude: nn.Module | None) -> list[tuple[str, nn.Module]]:
    """Top modules holding parameters outside the decoder layers, but ``exclude``'s subtree."""
    skip = {id(layers)} | ({id(exclude)} if exclude is not None else set())
    out = []

    def walk(m, prefix):
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if id(child) in skip:
                continue
            if any(True for _ in child.parameters(recurse=False)) or not list(child.children()):
                out.append((full, child))
            else:
                walk(child, full)

    walk(model, "")
    return out


def vocab_hint(model: nn.Module) -> int:
    """Rows of the output embedding (the vocabulary the logits cover)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else 1


def _bytes_when_filled(modules: list[tuple[str, nn.Module]], filler) -> int:
    """Bytes the meta parameters of ``modules`` take once ``filler`` materializes them."""
    size = torch.empty((), dtype=filler.dtype).element_size()
    seen, n = set(), 0
    for _, m in modules:
        for p in m.parameters():
            if p.device.type == "meta" and id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * size
    return n


@torch.no_grad()
def iter_logprobs(
    model: nn.Module, filler, wins: torch.Tensor, chunk: int = 8, device: str = "cpu"
) -> Iterator[torch.Tensor]:
    """Next-token log-probabilities ``[seq_len - 1, vocab]`` (float32, CPU) of each window of
    ``wins`` ``[n, seq_len]`` (int64), computed one decoder layer at a time, ``chunk`` windows at once.

    ``model``: a skeleton (or a PEFT model on one) whose meta parameters ``filler`` materializes.
    """
    inner = _inner(model)
    lname, layers = decoder_layers(inner)
    prefix_of = {id(m): n for n, m in model.named_modules()}
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    for start in range(0, len(wins), chunk):
        ids = wins[start : start + chunk].to(device)
        # 1. the inputs of layer 0: embeddings and everything outside the layers but the head
        catcher, first = _Catcher(), layers[0]
        layers[0] = catcher
        try:
            with contextlib.ExitStack() as stack:
                for name, m in _outside(inner, layers, head):
                    stack.enter_context(filler.filled(m, prefix_of[id(m)]))
                try:
                    model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
        finally:
            layers[0] = first
        hidden, kwargs = catcher.args[0], dict(catcher.kwargs)
        extra = catcher.args[1:]
        as_tuple = False
        # 2. each layer alone
        for layer in layers:
            with filler.filled(layer, prefix_of[id(layer)]):
                out = layer(hidden, *extra, **kwargs)
            as_tuple = isinstance(out, tuple)
            hidden = out[0] if as_tuple else out
        # 3. the head on the last hidden states, one window at a time (logits are [seq_len, vocab]).
        # The head is released before anything is yielded: a consumer running another model in
        # lockstep (eval.metrics.score) then never holds two heads (2 x 4.2 GB for a 70B in
        # float32). The log-probs of up to as many windows as fit in the head's own bytes are
        # computed per filling, so the head is read once per chunk unless a window's log-probs
        # are larger than the head.
        originals = list(layers)
        head = _outside(inner, layers, emb)
        per_window = (ids.shape[1] - 1) * vocab_hint(inner) * 4
        batch = max(1, _bytes_when_filled(head, filler) // max(1, per_window))
        try:
            for i in range(len(layers)):
                layers[i] = _Replay(None, as_tuple)
            for j0 in range(0, hidden.shape[0], batch):
                done = []
                with contextlib.ExitStack() as stack:
                    for name, m in head:
                        stack.enter_context(filler.filled(m, prefix_of[id(m)]))
                    for j in range(j0, min(j0 + batch, hidden.shape[0])):
                        layers[0].hidden = hidden[j : j + 1]
                        zeros = torch.zeros_like(hidden[j : j + 1])
                        logits = model(inputs_embeds=zeros, use_cache=False).logits[0, :-1]
                        done.append(logprobs_from_logits(logits))
                        del logits
                while done:
                    yield done.pop(0)
        finally:
            for i, m in enumerate(originals):
                layers[i] = m
        del hidden


class LayerwiseLM:
    """A model scored one decoder layer at a time: ``iter_logprobs(wins)`` like a whole model's
    per-window log-probs (see :func:`pipeline.layerwise.iter_logprobs`)."""

    def __init__(self, model: nn.Module, filler, vocab: int, device: str = "cpu", chunk: int = 8):
        self.model, self.filler, self.vocab, self.device, self.chunk = model, filler, vocab, device, chunk

    def iter_logprobs(self, wins: torch.Tensor) -> Iterator[torch.Tensor]:
        return iter_logprobs(self.model, self.filler, wins, self.chunk, self.device)


def plain_lm(path, cfg, dtype: torch.dtype, device: str = "cpu") -> LayerwiseLM:
    """An ordinary checkpoint (merged, dequantized base) run one layer at a time in ``dtype``."""
    from transformers import AutoConfig

    from pipeline.bnb4 import BaseTensors
    from pipeline.checkpoint import Checkpoint
    from pipeline.lora import tied_aliases

    ckpt = Checkpoint(path, what="checkpoint")
    config = AutoConfig.from_pretrained(ckpt.folder, trust_remote_code=cfg.base.trust_remote_code)
    model = skeleton(config).eval()
    filler = PlainFiller(BaseTensors(ckpt, cfg, source="original"), dtype, device, tied_aliases(model))
    return LayerwiseLM(model, filler, config.get_text_config().vocab_size, device)


def _adapter_rows(cfg, config, adapter_dir) -> dict:
    """``{"vocab_size": rows}`` when the adapter carries embedding rows of another count (training
    resized the vocabulary), else ``{}``."""
    from pipeline.checkpoint import AdapterFiles

    probe = skeleton(config)
    emb = probe.get_input_embeddings()
    rows = AdapterFiles(adapter_dir, cfg.adapter.allow_pickle).embedding_rows(
        next(n for n, m in probe.named_modules() if m is emb)
    )
    return {"vocab_size": rows} if rows and rows != emb.weight.shape[0] else {}


def unmerged_lm(cfg, adapter_dir, device: str = "cpu") -> LayerwiseLM:
    """The full-precision base with the adapter applied by PEFT, unmerged, in float32, one layer at a time."""
    from transformers import AutoConfig

    from pipeline.bnb4 import BaseTensors
    from pipeline.checkpoint import Checkpoint
    from pipeline.lora import attach_adapter, tied_aliases

    ckpt = Checkpoint(cfg.base.path)
    config = AutoConfig.from_pretrained(ckpt.folder, trust_remote_code=cfg.base.trust_remote_code)
    overrides = _adapter_rows(cfg, config, adapter_dir)
    model = skeleton(config, **overrides)
    aliases = tied_aliases(model)
    pm = attach_adapter(model, adapter_dir)
    filler = PlainFiller(BaseTensors(ckpt, cfg, source="original"), torch.float32, device, aliases)
    return LayerwiseLM(pm, filler, overrides.get("vocab_size") or config.get_text_config().vocab_size, device)


def reference_lm(cfg, adapter_dir, device: str = "cpu") -> LayerwiseLM:
    """The reference (the 4-bit base as training loaded it, the adapter applied by PEFT, unmerged)
    run one layer at a time: transformers' own 4-bit preprocessing of the skeleton
    (``Linear4bit`` where bitsandbytes quantizes), ``PeftModel.from_pretrained`` on it, and each
    layer's weights quantized by bitsandbytes when the layer runs (:class:`FourBitFiller`)."""
    from transformers import AutoConfig

    from pipeline.bnb4 import BaseTensors, quantize_skeleton
    from pipeline.checkpoint import Checkpoint
    from pipeline.lora import attach_adapter, tied_aliases

    ckpt = Checkpoint(cfg.base.path)
    config = AutoConfig.from_pretrained(ckpt.folder, trust_remote_code=cfg.base.trust_remote_code)
    tensors = BaseTensors(ckpt, cfg, source="dequantized")
    overrides = _adapter_rows(cfg, config, adapter_dir)
    model = quantize_skeleton(skeleton(config, **overrides), cfg, tensors.load_dtype, ckpt)
    aliases = tied_aliases(model)
    pm = attach_adapter(model, adapter_dir)
    filler = FourBitFiller(tensors, tensors.load_dtype, device, aliases)
    return LayerwiseLM(pm, filler, overrides.get("vocab_size") or config.get_text_config().vocab_size, device)
