"""GPTQ on a tiny model writes a standard GPTQ checkpoint that plain transformers reloads and runs."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_config
from pipeline import dequantize, merge, requantize, verify
from pipeline.errors import InputError


@pytest.fixture(scope="module")
def merged_run(tiny_base, tiny_adapter, tmp_path_factory):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path_factory.mktemp("gptq"))
    dequantize.run(cfg)
    merge.run(cfg)
    verify.run(cfg)
    return cfg


def test_gptq_checkpoint_reloads_in_plain_transformers(merged_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = requantize.run(merged_run)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["desc_act"] is True
    assert qc.get("checkpoint_format", "gptq") == "gptq"
    gen = json.loads((out / "generation_config.json").read_text())
    assert not gen.get("do_sample", False)  # GPTQModel's rewrite is undone
    assert not (merged_run.run_dir / ".gptq.partial").exists()

    q = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = AutoModelForCausalLM.from_pretrained(merged_run.run_dir / "merged", dtype=torch.float32).eval()
    layer = q.model.layers[0].self_attn.q_proj
    assert hasattr(layer, "qweight") and layer.qweight.dtype == torch.int32  # packed 4-bit, not a dense Linear
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def f(x): return x * 2  # the attribute reference", return_tensors="pt").input_ids
    with torch.no_grad():
        lq, lr = q(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    assert torch.isfinite(lq).all()
    # 4-bit GPTQ is close to, but not the same as, the merged model
    kl = (
        torch.nn.functional.kl_div(
            lq.log_softmax(-1), lr.log_softmax(-1), log_target=True, reduction="batchmean"
        ).item()
        / ids.shape[1]
    )
    assert 1e-6 < kl < 0.5


def test_group_size_that_does_not_divide_is_refused(merged_run):
    cfg = merged_run.model_copy(update={"requantize": merged_run.requantize.model_copy(update={"group_size": 128})})
    with pytest.raises(InputError, match="group_size 128 does not divide layer width"):
        requantize.run(cfg)


@pytest.mark.parametrize(
    "alt",
    [{}, {"bits": 3, "desc_act": False}, {"bits": 8, "sym": False}, {"sym": False, "mse": 2.4, "gptaq_alpha": 0.25}],
)
def test_float_copy_equals_the_torch_kernel(merged_run, alt, tmp_path):
    """On CPU the GPTQ variant is scored through a float copy of its weights (each dequantized once
    from qweight/qzeros/scales/g_idx). It must equal GPTQModel's torch kernel (TorchLinear, which
    computes scale * (q - z) in float16) to float round-off, and the default CPU kernel (bf16) to
    KL < 1e-3 nats/token."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    from pipeline.models import gptq_source
    from pipeline.textdata import embedded_topics

    cfg = merged_run.model_copy(update={"requantize": merged_run.requantize.model_copy(update=alt)})
    from pipeline import gptq

    rq = gptq.resolve(cfg.requantize)
    out = tmp_path / "q"
    from pipeline.models import load_tokenizer
    from pipeline.textdata import calibration_windows

    tok = load_tokenizer(cfg.layout.merged, cfg)
    gptq.quantize(
        cfg.layout.merged, out, rq, calibration_windows(tok, rq.calibration, 4, 128), "cpu", tmp_path / "logs"
    )
    ids = tok(embedded_topics("heldout")[1][:1500], return_tensors="pt").input_ids[:, :128]
    copy = gptq_source(out, cfg, "cpu")
    torch_kernel = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=GPTQConfig(bits=rq.bits, backend="torch")
    ).eval()
    default_kernel = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a = copy(input_ids=ids).logits.double()
        b = torch_kernel(input_ids=ids).logits.double()
        c = default_kernel(input_ids=ids).logits.double()
    assert (a - b).abs().max().item() < 1e-4
    p, q = c.log_softmax(-1), a.log_softmax(-1)
    assert (p.exp() * (p - q)).sum(-1).mean().item() < 1e-3


def test_offloaded_gptq_is_saved_in_the_asked_dtype(merged_run, tmp_path):
    """With GPTQModel's disk offload (large models), ``model.to(dtype)`` before the save broke it
    (offloaded placeholders changed dtype: "Offload metadata mismatch"); the checkpoint is now cast
    after the save: every floating tensor and config.json in the asked dtype, and it reloads."""
    import struct

    from pipeline import gptq
    from pipeline.models import load_tokenizer
    from pipeline.textdata import calibration_windows

    rq = merged_run.requantize
    calib = calibration_windows(load_tokenizer(merged_run.layout.merged, merged_run), rq.calibration, 4, 128)
    out = tmp_path / "gptq-offload"
    out.mkdir()
    gptq.quantize(merged_run.layout.merged, out, rq, calib, "cpu", tmp_path / "logs", dtype="bfloat16", offload=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    dtypes = {}
    for f in out.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        dtypes.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    assert {d for d in dtypes.values() if d.startswith(("F", "BF"))} == {"BF16"}
    assert any(k.endswith(".qweight") for k in dtypes)
    # transformers' own reload and the one-layer-at-a-time check of large models agree
    whole = gptq.reload_check(out, calib, merged_run, "cpu")
    assert gptq.reload_check(out, calib, merged_run, "cpu", layerwise=True) == pytest.approx(whole, rel=1e-3)
