"""Sensitivity of each quantized module: the mean KL(merged || merged with only that module
quantized), measured on calibration rows. A measurement over models, so it lives with the other
scoring; :mod:`pipeline.allocate` turns it into a per-module precision choice."""

from __future__ import annotations

import torch
from torch import nn

from eval.metrics import kl_per_token
from pipeline.allocate import quantized_names


@torch.no_grad()
def module_sensitivity(
    model: nn.Module, tensors, wins: torch.Tensor, modules: list[str] | None = None, progress: str | None = None
) -> dict[str, float]:
    """Mean KL(model || model with only module ``m`` quantized), nats/token, for each quantized module.

    Args:
        model: the float model (the merged checkpoint, whole, in float32).
        tensors: the GPTQ checkpoint as floats (:class:`pipeline.gptq.GPTQTensors`).
        wins: token windows ``[n, seq_len]``, or a list of 1-D token tensors (calibration rows).
        modules: names to probe (default: every quantized module of ``tensors``).

    Each probe reruns only the decoder layers from the module's own layer on (their inputs are
    captured once) and the head.
    """
    import torch.nn.functional as F
    from tqdm import tqdm

    from pipeline.layerwise import _Replay, decoder_layers

    lname, layers = decoder_layers(model)
    modules = modules or quantized_names(tensors)
    named = dict(model.named_modules())
    captured: list[list] = [[] for _ in layers]  # per layer, per window: (args, kwargs)

    def pre(i):
        def hook(mod, args, kwargs):
            captured[i].append((args, kwargs))

        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    base = []
    try:
        for w in wins:
            base.append(F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0, :-1].float(), -1))
    finally:
        for h in handles:
            h.remove()

    def head(hidden) -> torch.Tensor:
        originals = list(layers)
        try:
            as_tuple = False
            for i in range(len(layers)):
                layers[i] = _Replay(None, as_tuple)
            layers[0].hidden = hidden
            return model(inputs_embeds=torch.zeros_like(hidden), use_cache=False).logits[0, :-1]
        finally:
            for i, m in enumerate(originals):
                layers[i] = m

    out = {}
    for name in tqdm(modules, desc=progress, disable=progress is None, leave=False):
        idx = int(name[len(lname) + 1 :].split(".")[0])
        mod = named[name]
        orig = mod.weight.data
        mod.weight.data = tensors.get(name + ".weight").to(orig.dtype)
        try:
            kls = []
            for j in range(len(wins)):
                args, kwargs = captured[idx][j]
                hidden = args[0]
                for layer in layers[idx:]:
                    o = layer(hidden, *args[1:], **kwargs)
                    hidden = o[0] if isinstance(o, tuple) else o
                logp = F.log_softmax(head(hidden).float(), -1)
                kls.append(kl_per_token(base[j], logp))
            out[name] = float(torch.cat(kls).mean())
        finally:
            mod.weight.data = orig
    return out
