"""The merge is exact: merged weights equal W_deq + scaling * B @ A, and the merged model's
next-token distribution equals the reference (4-bit base + unmerged adapter)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_adapter, tiny_config
from pipeline import dequantize, merge, verify
from pipeline.checkpoint import AdapterFiles
from pipeline.models import load_4bit_base
from pipeline.errors import VerificationError


def _fresh_dequantized(cfg) -> dict:
    """W_deq of every Linear4bit, computed directly with bitsandbytes on a freshly loaded 4-bit base."""
    import bitsandbytes as bnb

    model = load_4bit_base(cfg, "cpu")
    return {
        f"{n}.weight": bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def test_merged_weights_follow_the_lora_formula(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path)
    dequantize.run(cfg)
    out = merge.run(cfg)[0]
    assert out.name == "merged-dequantized.unverified"
    merged = load_file(out / "model.safetensors")
    lora = load_file(tiny_adapter / "adapter_model.safetensors")
    acfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    scaling = acfg["lora_alpha"] / acfg["r"]
    w_deq = _fresh_dequantized(cfg)
    names = AdapterFiles(tiny_adapter).changed_modules()["lora"]
    assert len(names) == 2 * 7  # 2 layers x 7 projections
    for name in names:
        a = lora[f"base_model.model.{name}.lora_A.weight"]
        b = lora[f"base_model.model.{name}.lora_B.weight"]
        expected = w_deq[f"{name}.weight"] + scaling * (b @ a)
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=0, atol=1e-6)
        assert (b @ a).abs().max() > 1e-2  # the adapter is not a no-op
    assert not any("lora" in k for k in merged)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_verify_passes_with_fp32_kl_below_1e6(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path)
    dequantize.run(cfg)
    merge.run(cfg)
    final = verify.run(cfg)
    rec = json.loads((cfg.run_dir / "stages" / "verify.json").read_text())
    assert final.name == "merged" and (final / "model.safetensors").is_file()
    assert rec["passed"] is True
    assert rec["kl_divergence"] < 1e-6
    assert rec["top1_agreement"] == 1.0


def test_wrong_scaling_is_caught_and_nothing_published(tiny_base, tiny_adapter, tmp_path):
    """Break the merge once (double the LoRA delta): verification must refuse it."""
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path)
    deq = dequantize.run(cfg)
    out = merge.run(cfg)[0]
    merged, base = load_file(out / "model.safetensors"), load_file(deq / "model.safetensors")
    broken = {k: (2 * v - base[k]) if k in base and not torch.equal(v, base[k]) else v for k, v in merged.items()}
    from safetensors.torch import save_file

    save_file(broken, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="exceeds the bound"):
        verify.run(cfg)
    assert not list(cfg.run_dir.glob("merged")) and not list(cfg.run_dir.glob("merged-original"))
    assert (cfg.run_dir / "merged-dequantized.rejected").is_dir()
    assert json.loads((cfg.run_dir / "stages" / "verify.json").read_text())["passed"] is False


def test_lost_adapter_is_caught(tiny_base, tmp_path):
    """An all-zero LoRA (B = 0, PEFT's default init) leaves the weights unchanged: refused."""
    zero = make_adapter(tiny_base, tmp_path / "zero", init_lora_weights=True)
    from safetensors.torch import load_file as lf, save_file

    t = lf(zero / "adapter_model.safetensors")
    save_file(
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in t.items()},
        zero / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    cfg = tiny_config(tiny_base, zero, tmp_path / "runs")
    dequantize.run(cfg)
    merge.run(cfg)
    with pytest.raises(VerificationError, match="adapted weight unchanged"):
        verify.run(cfg)


def test_auto_merge_base_keeps_the_lower_perplexity(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path, merge={"base": "auto"})
    dequantize.run(cfg)
    merge.run(cfg)
    verify.run(cfg)
    rec = json.loads((cfg.run_dir / "stages" / "verify.json").read_text())
    c = rec["candidates"]
    best = min(c, key=lambda b: c[b]["perplexity"])
    other = ({"dequantized", "original"} - {best}).pop()
    assert rec["merge_base"] == best and rec["merge_base_reason"].startswith("auto: lowest perplexity")
    assert c[best]["artefact"].endswith("/merged") and (cfg.run_dir / f"merged-{other}").is_dir()
    assert all(x["exact_kl"] < 1e-6 for x in c.values())


def test_choose_rules():
    r = {"dequantized": {"passed": True, "perplexity": 10.0}, "original": {"passed": True, "perplexity": 9.0}}
    assert verify.choose("auto", r)[0] == "original"
    assert verify.choose("dequantized", r)[0] == "dequantized"
    r["original"]["passed"] = False
    assert verify.choose("auto", r)[0] == "dequantized"  # a candidate that failed is never chosen
