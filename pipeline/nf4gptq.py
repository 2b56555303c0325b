"""Prototype (issue 13): GPTQ's error compensation onto bitsandbytes' NF4 grid.

The merged weights are ``dequant(NF4(W0)) + s * B @ A``: most of each weight already sits on
the base's NF4 grid. bitsandbytes' own NF4 of the merged model rounds each weight to the
nearest code (RTN); this quantizer chooses the same kind of codes (blocks of 64 consecutive
weights of a row, one absmax each, double-quantized as bitsandbytes stores it) but in GPTQ's
order, spreading each column's rounding error over the columns not yet quantized through the
inverse Hessian of the layer's calibration inputs (Frantar et al. 2022, arXiv:2210.17323,
Algorithm 1, with lazy batch updates and optional act-order). The absmax of every block is the
one bitsandbytes computes from the merged weights (static groups), so the output is a standard
bitsandbytes 4-bit checkpoint that ``transformers`` reloads as it is (tested).

    python -m pipeline.nf4gptq --config configs/smollm2-135m-demo.yaml

runs after the default run's merge stage: it writes ``<run>/nf4-gptq-<scales>/`` (a bitsandbytes
NF4 checkpoint, the unquantized weights in the merged checkpoint's dtype) and
``<run>/nf4-gptq-<scales>.json`` (KL, top-1 and perplexity against the reference on the
config's eval texts, beside bitsandbytes' RTN NF4 of the same merged model and the run's GPTQ
checkpoint from ``report.json``). Not a pipeline stage: a measured experiment.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.common import dir_size_bytes, log, publish_dir, write_json

BLOCK = 64  # bitsandbytes' 4-bit blocksize (Params4bit's default, what transformers uses)


def nf4_code() -> torch.Tensor:
    """bitsandbytes' 16 NF4 values in [-1, 1], ascending, float32 [16] (index = the 4-bit code)."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu").float()


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int64, shape of ``x``) of the nearest value of ``code`` [16] (ascending) to each
    element of ``x``; ties go to the upper value, as bitsandbytes' quantizer does."""
    mid = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x.clamp(-1, 1), mid, right=True)


@torch.no_grad()
def gptq_nf4(
    w: torch.Tensor, h: torch.Tensor, absmax: torch.Tensor, damp: float = 0.01, act_order: bool = True, block: int = 128
) -> torch.Tensor:
    """NF4 codes of a linear weight chosen by GPTQ with fixed (static) block scales.

    Args:
        w: weight [out, in], any float dtype (computed in float32).
        h: Hessian of the layer's inputs ``2/n sum x x^T`` [in, in], float32.
        absmax: the scale of each block of ``BLOCK`` consecutive weights of a row, [out, in / BLOCK]
            float32 (bitsandbytes' dequantized absmax, double quantization applied).
        damp: fraction of the mean Hessian diagonal added to it (GPTQ's ``percdamp``).
        act_order: quantize columns in order of decreasing Hessian diagonal (scales stay those
            of each column's own block, so the checkpoint layout is unchanged).
        block: columns per lazy batch update.
    Returns:
        codes, int64 [out, in] in 0..15; the quantized weight is ``nf4_code()[codes] * scale``.
    Raises:
        ValueError: ``in`` not a multiple of ``BLOCK``, or shapes that do not match.
    """
    rows, cols = w.shape
    if cols % BLOCK or absmax.shape != (rows, cols // BLOCK) or h.shape != (cols, cols):
        raise ValueError(f"weight {tuple(w.shape)}, absmax {tuple(absmax.shape)}, hessian {tuple(h.shape)} do not fit")
    code = nf4_code()
    w = w.float().clone()
    h = h.float().clone()
    scale = absmax.float().repeat_interleave(BLOCK, dim=1)  # [out, in]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h, scale = w[:, perm], h[perm][:, perm], scale[:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s = scale[:, i1 + i]
            c = nearest_code(w1[:, i] / s, code)
            codes[:, i1 + i] = c
            e = (w1[:, i] - code[c] * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)]


def effective_absmax(qs) -> torch.Tensor:
    """The per-block scale a bitsandbytes quant state dequantizes with, float32 [blocks]: the
    stored absmax, or under double quantization its 8-bit blockwise dequantization plus offset."""
    import bitsandbytes.functional as F

    if qs.nested:
        return F.dequantize_blockwise(qs.absmax, qs.state2).float() + qs.offset
    return qs.absmax.float()


def pack(codes: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' packed layout of 4-bit codes [out, in] (int64 0..15): two codes per byte, the
    first in the high nibble, as a uint8 column [out * in / 2, 1]."""
    flat = codes.reshape(-1).to(torch.uint8)
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack`: int64 codes of ``shape`` from bitsandbytes' packed uint8 weight."""
    p = packed.reshape(-1)
    return torch.stack([(p >> 4), (p & 15)], 1).reshape(shape).long()


def _hessians(layer, inputs: list[tuple], targets: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """``2/n sum x x^T`` of each target linear's input over every calibration row (float32)."""
    hs = {n: torch.zeros(m.in_features, m.in_features) for n, m in targets.items()}
    count = {n: 0 for n in targets}

    def hook(name):
        def f(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            k = x.shape[0]
            hs[name] *= count[name] / (count[name] + k)
            count[name] += k
            x = (2 / count[name]) ** 0.5 * x
            hs[name] += x.T @ x

        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    for args, kwargs in inputs:
        layer(*args, **kwargs)
    for hd in handles:
        hd.remove()
    return hs


@torch.no_grad()
def quantize_model(float_model, nf4_model, rows: list[dict], act_order: bool = True, damp: float = 0.01) -> dict:
    """GPTQ onto NF4, layer by layer, as GPTQ runs: each decoder layer's calibration inputs come from
    the layers before it already quantized. Writes the chosen codes into ``nf4_model``'s
    ``Linear4bit`` weights (its quant states, computed by bitsandbytes from the same merged
    weights, are kept) and the quantized values into ``float_model``.

    Args:
        float_model: the merged model in float32 (modified in place).
        nf4_model: the same model loaded in bitsandbytes NF4 (modified in place).
        rows: calibration rows ``{"input_ids": [tokens]}``.
    Returns:
        ``{"modules": n, "weights": n, "codes_changed": fraction of codes that differ from bitsandbytes' RTN,
        "seconds": s}``.
    Raises:
        AssertionError: a packed weight does not dequantize to the chosen values (bitsandbytes'
            layout changed).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from pipeline.layerwise import _Captured, _Catcher, decoder_layers

    t0 = time.perf_counter()
    code = nf4_code()
    _, layers = decoder_layers(float_model)
    _, layers4 = decoder_layers(nf4_model)
    first, catcher, inputs = layers[0], _Catcher(), []
    layers[0] = catcher
    for r in rows:
        try:
            float_model(torch.tensor([r["input_ids"]]), use_cache=False)
        except _Captured:
            inputs.append((catcher.args, catcher.kwargs))
    layers[0] = first
    stats = {"modules": 0, "weights": 0, "changed": 0}
    for i, (layer, layer4) in enumerate(zip(layers, layers4)):
        targets = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        q4 = {n: m for n, m in layer4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        hs = _hessians(layer, inputs, {n: targets[n] for n in q4})
        for n, m4 in q4.items():
            w, qs = targets[n].weight, m4.weight.quant_state
            absmax = effective_absmax(qs).reshape(w.shape[0], -1)
            codes = gptq_nf4(w.data, hs[n], absmax, damp=damp, act_order=act_order)
            q = code[codes] * absmax.repeat_interleave(BLOCK, dim=1)
            rtn = unpack(m4.weight.data, w.shape)  # bitsandbytes' own round-to-nearest codes
            m4.weight.data = pack(codes)
            back = F.dequantize_4bit(m4.weight.data, qs).float().reshape(w.shape)
            assert torch.equal(back, q.to(back.dtype).float()), f"layer {i} {n}: packed codes do not dequantize back"
            w.data.copy_(q.to(w.dtype))
            stats["modules"] += 1
            stats["weights"] += codes.numel()
            stats["changed"] += int((codes != rtn).sum())
        outs = []
        for args, kwargs in inputs:
            out = layer(*args, **kwargs)
            outs.append(((out[0] if isinstance(out, tuple) else out),) + tuple(args[1:]))
        inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs)]
        log(f"nf4-gptq: layer {i + 1}/{len(layers)} ({time.perf_counter() - t0:.0f} s)")
    return {
        "modules": stats["modules"],
        "weights": stats["weights"],
        "codes_changed": stats["changed"] / max(stats["weights"], 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _point(s: dict) -> dict:
    """KL, top-1 agreement and perplexity of one :func:`eval.metrics.score` result."""
    return {"kl_divergence": s["kl_divergence"], "top1_agreement": s["top1_agreement"], "perplexity": s["perplexity"]}


def main(argv=None) -> int:
    """The experiment on a config's run (its ``merged/`` and, for comparison, ``report.json``):
    scores bitsandbytes' RTN NF4 (``--scales merged``) and the NF4-GPTQ checkpoint against the
    reference. Returns 0; exceptions propagate (an experiment, not a stage)."""
    from eval.baselines import bnb_nf4_model
    from eval.metrics import ReferenceCache, score
    from pipeline import config as config_mod
    from pipeline.models import (
        apply_runtime,
        disable_bnb_cpu_repacking,
        load_4bit_base,
        load_causal_lm,
        load_tokenizer,
        reference_model,
    )
    from pipeline.textdata import calibration_set, text_windows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m-demo.yaml")
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument(
        "--scales",
        choices=("merged", "base"),
        default="merged",
        help="block absmax: bitsandbytes' of the merged weights, or the 4-bit base's own (the grid the reference runs on)",
    )
    a = ap.parse_args(argv)
    cfg = config_mod.load_config(a.config)
    layout, rq = cfg.layout, cfg.requantize
    apply_runtime(cfg.runtime)
    tok = load_tokenizer(layout.merged, cfg)

    def load_nf4(path):
        return bnb_nf4_model(path, cfg, "cpu", torch.float32)  # dequantize + float32 matmul

    wins = {d.name: text_windows(tok, d, cfg.eval.seq_len, f"eval.datasets[{d.name}]") for d in cfg.eval.datasets}
    ref_model = reference_model(cfg, cfg.effective_adapter, "cpu")
    disable_bnb_cpu_repacking(ref_model)
    ref = {n: ReferenceCache(ref_model) for n in wins}
    out: dict = {"config": a.config, "act_order": not a.no_act_order, "scales": a.scales, "variants": {}}
    if a.scales == "merged":
        nf4_model = load_nf4(layout.merged)
        for n, w in wins.items():  # RTN: bitsandbytes' own NF4 of the merged model (fills the reference cache)
            out["variants"].setdefault("bnb_nf4_rtn", {})[n] = _point(score(nf4_model, w, ref=ref[n]))
    else:  # the reference's own 4-bit base: its quant states are the grid the adapter was trained on
        nf4_model = load_4bit_base(cfg, "cpu").eval()
    rows, comp = calibration_set(tok, rq.calibration, rq.num_samples, rq.seq_len)
    float_model = load_causal_lm(layout.merged, cfg, device="cpu", dtype=torch.float32).eval()
    out["gptq"] = quantize_model(float_model, nf4_model, rows, act_order=not a.no_act_order, damp=rq.damp_percent)
    out["calibration"] = {"name": comp["name"], "tokens": comp["tokens"], "windows": comp["windows"]}
    merged = dict(float_model.named_parameters())
    store = getattr(torch, cfg.out_dtype)
    for name, p in nf4_model.named_parameters():  # the rest as the merged checkpoint stores it
        if p.dtype.is_floating_point:
            p.data = merged[name].data.to(store)
    del float_model, merged
    dest = layout.root / f"nf4-gptq-{a.scales}"
    with publish_dir(dest) as tmp:
        nf4_model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    del nf4_model
    reloaded = load_nf4(dest)  # the checkpoint as transformers reloads it
    for n, w in wins.items():
        out["variants"].setdefault("nf4_gptq", {})[n] = _point(score(reloaded, w, ref=ref[n]))
    out["variants"]["nf4_gptq"]["size_bytes"] = dir_size_bytes(dest)
    out["variants"]["nf4_gptq"]["tokens"] = {n: int(w[:, 1:].numel()) for n, w in wins.items()}
    rep = layout.report_json
    if rep.is_file():
        v = json.loads(rep.read_text())["variants"]
        for name in ("gptq", "rtn", "bnb_nf4"):
            if name in v:
                out["variants"][f"run:{name}"] = {
                    n: {k: v[name][k].get(n) for k in ("kl_divergence", "top1_agreement", "perplexity")} for n in wins
                } | {"size_bytes": v[name]["size_bytes"]}
    write_json(layout.root / f"nf4-gptq-{a.scales}.json", out)
    for name, r in out["variants"].items():
        for n in wins:
            log(
                f"nf4-gptq: {name:12s} {n}: KL {r[n]['kl_divergence']:.4f} top-1 {r[n]['top1_agreement']:.4f} ppl {r[n]['perplexity']:.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
