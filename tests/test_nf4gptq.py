"""The NF4-grid GPTQ prototype (pipeline/nf4gptq.py): bitsandbytes' packed layout, GPTQ reducing
to round-to-nearest without input correlation, its proxy loss below RTN's with it, and a tiny
model whose codes are written into a bitsandbytes checkpoint that transformers reloads exactly."""

from __future__ import annotations

import pytest
import torch

from helpers import make_llama
from pipeline import nf4gptq as ng

bnbf = pytest.importorskip("bitsandbytes.functional")


def _quantized(w):
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return packed, qs, ng.effective_absmax(qs).reshape(w.shape[0], -1)


def test_pack_is_bitsandbytes_layout_and_codes_dequantize_exactly():
    torch.manual_seed(0)
    w = torch.randn(32, 192) * 0.02
    packed, qs, absmax = _quantized(w)
    codes = ng.unpack(packed, w.shape)
    assert torch.equal(ng.pack(codes), packed)
    # any codes we choose dequantize, through bitsandbytes, to code value x the block's scale
    other = torch.randint(0, 16, w.shape)
    want = ng.nf4_code()[other] * absmax.repeat_interleave(64, 1)
    assert torch.equal(bnbf.dequantize_4bit(ng.pack(other), qs).float(), want)


def test_gptq_without_correlation_is_round_to_nearest():
    torch.manual_seed(1)
    w = torch.randn(16, 128) * 0.05
    _, _, absmax = _quantized(w)
    rtn = ng.nearest_code(w / absmax.repeat_interleave(64, 1), ng.nf4_code())
    for act_order in (False, True):
        assert torch.equal(ng.gptq_nf4(w, 2 * torch.eye(128), absmax, act_order=act_order), rtn)


def test_gptq_halves_the_proxy_loss_on_correlated_inputs():
    torch.manual_seed(2)
    w = torch.randn(48, 128) * 0.05
    x = torch.randn(1024, 128) @ (0.3 * torch.randn(128, 128) + torch.eye(128))
    h = 2 * x.T @ x / len(x)
    _, _, absmax = _quantized(w)
    scale = absmax.repeat_interleave(64, 1)
    code = ng.nf4_code()

    def loss(codes):
        d = w - code[codes] * scale
        return torch.trace(d @ h @ d.T).item()

    rtn = loss(ng.nearest_code(w / scale, code))
    for act_order in (False, True):
        assert loss(ng.gptq_nf4(w, h, absmax, act_order=act_order)) < 0.7 * rtn
    with pytest.raises(ValueError, match="do not fit"):
        ng.gptq_nf4(w[:, :100], h[:100, :100], absmax)


def test_tiny_model_codes_reload_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from pipeline.models import disable_bnb_cpu_repacking

    base = make_llama(tmp_path / "base", hidden=64, layers=2)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="float32"
    )

    def load4(path):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=bnb).eval()
        disable_bnb_cpu_repacking(m)
        return m

    fm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    m4 = load4(base)
    before = {n: p.detach().clone() for n, p in m4.named_parameters() if p.dtype == torch.uint8}
    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(2, 384, (64,)).tolist()} for _ in range(4)]
    out = ng.quantize_model(fm, m4, rows)
    assert out["modules"] == 2 * 7 and 0 < out["codes_changed"] < 1  # GPTQ moved some codes off RTN's
    assert any(not torch.equal(p, before[n]) for n, p in m4.named_parameters() if n in before)
    m4.save_pretrained(tmp_path / "nf4")
    back = load4(tmp_path / "nf4")
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        want, got = fm(ids).logits, back(ids).logits
    # the float model holds the chosen values; the reloaded NF4 checkpoint computes with the same
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
