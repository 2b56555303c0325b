"""What the scale benchmark (issue 10) changed in the streaming code gives the same values as before:
converting while reading, the output dtype read directly, the allocation-free finite check, KL in
row blocks; the per-stage peak RSS is the stage's own; the synthetic checkpoints are what
transformers and PEFT expect. No timings here (``make bench-scale`` measures)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from helpers import tiny_config
import pipeline.checkpoint as ckpt_mod
from pipeline.common import all_finite, peak_rss_bytes

DTYPES = (None, torch.bfloat16, torch.float16, torch.float32)


def test_converting_while_reading_equals_converting_the_whole_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "_CONVERT_CHUNK_BYTES", 1000)  # many slices, odd boundaries
    torch.manual_seed(0)
    tensors = {
        "a": torch.randn(37, 53),
        "b": torch.randn(1001).to(torch.bfloat16),
        "c": torch.randn(0, 4),
        "d": torch.randn(3, 5).half(),
        "e": torch.tensor(3.0),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    for name, t in tensors.items():
        for via in DTYPES:
            for dtype in DTYPES:
                got = ckpt_mod.read_tensor(tmp_path / "m.safetensors", name, {}, dtype=dtype, via=via)
                want = t
                for d in (via, dtype):
                    want = want if d is None else want.to(d)
                assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("src,dst", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_half_to_half_equals_the_float32_round_trip_except_nan_payloads(src, dst):
    """Why reading straight into the output dtype keeps every value: widening to float32 is exact."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(src)
    a, b = x.to(dst), x.to(torch.float32).to(dst)
    differ = a.view(torch.int16) != b.view(torch.int16)
    assert bool(torch.isnan(x[differ]).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_finite_equals_isfinite_all(dtype):
    for n in (1, 7, 64, 1000, 1 << 16):
        for pos in (0, n // 2, n - 1):
            for bad in (float("nan"), float("inf"), float("-inf")):
                t = torch.randn(n).to(dtype)
                t[pos] = bad
                assert all_finite(t) is False
        assert all_finite(torch.randn(n).to(dtype)) is True
    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.arange(5))


def test_kl_in_row_blocks_equals_the_whole_window():
    from eval.metrics import kl_per_token

    torch.manual_seed(0)
    a = torch.log_softmax(torch.randn(37, 1000) * 3, -1)
    b = torch.log_softmax(torch.randn(37, 1003) * 3, -1)
    a[0, :10] = -float("inf")
    b[3, 7] = float("nan")
    whole = kl_per_token(a, b, rows=10**6)
    for rows in (1, 5, 16):
        assert torch.equal(kl_per_token(a, b, rows=rows).nan_to_num(-1), whole.nan_to_num(-1))


def test_base_tensors_in_another_dtype_equal_the_float32_ones_cast(tiny_base, tiny_adapter, tmp_path):
    from pipeline.bnb4 import BaseTensors
    from pipeline.checkpoint import Checkpoint

    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path, dequantize={"compute_dtype": "bfloat16"})
    tensors = BaseTensors(Checkpoint(tiny_base), cfg)
    assert any(tensors.quantized(n) for n in tensors.targets) and not all(tensors.quantized(n) for n in tensors.targets)
    for name in tensors.targets:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert torch.equal(tensors.get(name, dtype), tensors.get(name).to(dtype)), (name, dtype)


def test_a_stage_process_reports_its_own_peak_not_its_parents():
    big = bytearray(512 << 20)
    for i in range(0, len(big), 4096):
        big[i] = 1
    code = "from pipeline.common import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.check_output([sys.executable, "-c", code], text=True).strip())
    assert peak_rss_bytes() > 512 << 20 and child < 400 << 20
    del big


def test_synthetic_checkpoint_and_adapter_load_in_transformers_and_peft(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline import bench_scale
    from pipeline.checkpoint import AdapterFiles, Checkpoint
    from pipeline.lora import adapter_tensors, attach_adapter, build_skeleton

    shape = {"hidden": 64, "intermediate": 160, "heads": 4, "kv_heads": 2, "vocab": 1000}
    facts = bench_scale.write_base(tmp_path / "base", shape, 2, shard_gb=100e3 / 1e9)  # several shards
    bench_scale.write_adapter(tmp_path / "adapter", shape, 2)
    ck = Checkpoint(tmp_path / "base")
    assert len(ck.files) > 1 and (tmp_path / "base" / "model.safetensors.index.json").is_file()
    assert ck.nbytes() == facts["bytes"] and sum(t.numel for t in ck.tensors.values()) == facts["params"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert model.config.vocab_size == 1000 and model.config.num_hidden_layers == 2
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert 0.015 < model.model.layers[1].mlp.down_proj.weight.float().std() < 0.025
    pm = attach_adapter(build_skeleton(AutoConfig.from_pretrained(tmp_path / "base")), tmp_path / "adapter")
    lora = adapter_tensors(pm)
    assert len(lora) == 2 * 7 * 2 and all(p.abs().sum() > 0 for p in lora.values())
    assert AdapterFiles(tmp_path / "adapter").changed_modules()["lora"][0].startswith("model.layers.0.")
