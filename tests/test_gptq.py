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
