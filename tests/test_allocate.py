"""Per-module precision: a GPTQ checkpoint with chosen modules kept in 16-bit reloads in plain
transformers with exactly the listed bits (optimum's ``modules_in_block_to_quantize``), while
GPTQModel's per-module ``dynamic`` bit widths do not; sensitivities and the greedy choice."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config

from eval.sensitivity import module_sensitivity
from pipeline import allocate, dequantize, merge, requantize, verify
from pipeline.gptq import GPTQTensors

KEEP = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def quantized(tiny_base, tiny_adapter, tmp_path_factory):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path_factory.mktemp("alloc"))
    for stage in (dequantize, merge, verify, requantize):
        stage.run(cfg)
    return cfg


def test_spliced_checkpoint_reloads_in_plain_transformers_with_the_listed_bits(quantized, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = quantized
    out = tmp_path / "mixed"
    bits = allocate.splice(cfg.layout.gptq, cfg.layout.merged, KEEP, out)
    assert {m for m, b in bits.items() if b == 16} == set(KEEP) and len(bits) == 14
    assert allocate.module_bits(out) == bits  # read back from the tensors alone
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["modules_in_block_to_quantize"][0]) == 12 and not set(KEEP) & set(
        qc["modules_in_block_to_quantize"][0]
    )
    assert set(qc["dynamic"]) == {r"-:^model\.layers\.0\.self_attn\.q_proj$", r"-:^model\.layers\.1\.mlp\.down_proj$"}

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    mods = dict(model.named_modules())
    merged = AutoModelForCausalLM.from_pretrained(cfg.layout.merged, dtype=torch.float32)
    for name, b in bits.items():
        m = mods[name]
        if b == 16:
            assert type(m) is torch.nn.Linear
            # the merged weight in the GPTQ checkpoint's float dtype (float16 here)
            want = dict(merged.named_modules())[name].weight.to(torch.float16).float()
            torch.testing.assert_close(m.weight, want, rtol=0, atol=0)
        else:
            assert hasattr(m, "qweight") and m.bits == 4, name
    # the reloaded model computes what the dequantized tensors say (CPU kernel in bf16: loose bound)
    ids = torch.arange(3, 60)[None]
    from pipeline.models import gptq_source

    ref = gptq_source(out, cfg, "cpu")
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    kl = torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="none")
    assert kl.sum(-1).mean() < 1e-2 and torch.isfinite(a).all()


def test_gptqmodel_dynamic_bit_widths_do_not_reload_in_plain_transformers(quantized, tmp_path):
    """The evidence for the 16-bit/global-bits design: per-module bits (GPTQModel ``dynamic``)
    quantize, but optimum builds every Linear at the global bits and loading fails."""
    from transformers import AutoModelForCausalLM

    from pipeline import gptq
    from pipeline.models import load_tokenizer
    from pipeline.textdata import calibration_windows

    cfg = quantized
    rq = cfg.requantize
    qcfg = gptq.quantize_config(rq, offload=False)
    qcfg.dynamic = {r"+:.*down_proj.*": {"bits": 8}}
    calib = calibration_windows(load_tokenizer(cfg.layout.merged, cfg), rq.calibration, 2, 64)
    from gptqmodel import BACKEND, GPTQModel

    m = GPTQModel.load(str(cfg.layout.merged), qcfg, device="cpu", dtype=torch.float32)
    m.quantize(calib, batch_size=1, backend=BACKEND.AUTO)
    m.save(str(tmp_path / "dyn"))
    assert allocate.module_bits(tmp_path / "dyn")["model.layers.0.mlp.down_proj"] == 8
    with pytest.raises(Exception, match="(?i)mismatch"):  # down_proj.qweight: checkpoint 8-bit, model 4-bit
        AutoModelForCausalLM.from_pretrained(tmp_path / "dyn")


def test_choose_fp16_most_loss_per_byte_first():
    sens = {"a": 0.04, "b": 0.01, "c": 0.03, "d": 0.02}
    cost = {"a": 3.0, "b": 1.0, "c": 1.0, "d": 4.0}
    # loss per byte: c 0.03, a 0.0133, b 0.01, d 0.005; the sum 0.10 is scaled to the measured 0.2
    kept, pred = allocate.choose_fp16(sens, cost, total=0.2, target=0.1)
    assert kept == ["c", "a"] and pred == pytest.approx(0.2 - 2 * 0.07)
    kept, pred = allocate.choose_fp16(sens, cost, total=0.2, target=0.15)
    assert kept == ["c"] and pred == pytest.approx(0.14)
    assert allocate.choose_fp16(sens, cost, total=0.2, target=0.3) == ([], 0.2)
    # a cap of 25% of the extra bytes (2.25 of 9): c, then a does not fit, b does
    assert allocate.choose_fp16(sens, cost, total=0.2, target=0.0, max_fraction=0.25)[0] == ["c", "b"]


def test_module_sensitivity_measures_one_module_at_a_time(quantized):
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.textdata import text_windows

    cfg = quantized
    model = load_causal_lm(cfg.layout.merged, cfg, dtype=torch.float32)
    wins = text_windows(load_tokenizer(cfg.layout.merged, cfg), cfg.verify.data, 64, "verify.data")[:2]
    tensors = GPTQTensors(cfg.layout.gptq)
    sens = module_sensitivity(model, tensors, wins, modules=KEEP)
    assert set(sens) == set(KEEP) and all(v > 0 for v in sens.values())
    # the same number computed the slow way: quantize that one module in a whole-model forward
    from eval.metrics import kl_per_token, window_logprobs

    mod = dict(model.named_modules())[KEEP[1]]
    base = [window_logprobs(model, w) for w in wins]
    orig = mod.weight.data
    mod.weight.data = tensors.get(KEEP[1] + ".weight")
    slow = torch.cat([kl_per_token(b, window_logprobs(model, w)) for b, w in zip(base, wins)]).mean().item()
    mod.weight.data = orig
    assert sens[KEEP[1]] == pytest.approx(slow, rel=1e-4)
