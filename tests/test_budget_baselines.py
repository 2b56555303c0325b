"""Quality budget, GPTQ alternatives and round-to-nearest, on the tiny model."""

from __future__ import annotations

import json

import torch

from helpers import tiny_config
from eval.baselines import rtn_
from pipeline import dequantize, merge, requantize, verify


def test_rtn_matches_hand_computed_values():
    lin = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.7, -0.33, 0.12, 0.0]]))
    model = torch.nn.Sequential(lin)
    assert rtn_(model, bits=4, group_size=4, sym=True) == 4
    s = 0.7 / 7  # max|w| / (2^(4-1) - 1); codes round(w / s) = 7, -3, 1, 0
    torch.testing.assert_close(lin.weight, torch.tensor([[7 * s, -3 * s, 1 * s, 0.0]]), rtol=0, atol=1e-7)
    lin2 = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin2.weight.copy_(torch.tensor([[1.0, 2.2, 4.0]]))
    # asymmetric 2-bit, one group: s = (4 - 1) / 3 = 1, z = round(-1 / 1) = -1, codes 0, 1, 3
    rtn_(torch.nn.Sequential(lin2), bits=2, group_size=-1, sym=False)
    torch.testing.assert_close(lin2.weight, torch.tensor([[1.0, 2.0, 4.0]]), rtol=0, atol=1e-6)


def test_budget_keeps_the_smallest_setting_within_budget(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(
        tiny_base,
        tiny_adapter,
        tmp_path,
        requantize={
            "budget": {"max_kl": 0.02, "settings": [{"bits": 8}, {"bits": 2}]},
            "alternatives": [{"bits": 3, "desc_act": False}],
        },
    )
    dequantize.run(cfg)
    merge.run(cfg)
    verify.run(cfg)
    out = requantize.run(cfg)
    rec = json.loads((cfg.run_dir / "stages" / "requantize.json").read_text())
    tried = rec["budget"]["tried"]
    assert [t["bits"] for t in tried] == [2, 8]  # smallest first, whatever the config order
    assert tried[0]["within_budget"] is False and tried[0]["kl_divergence"] > 0.02 and tried[0]["artefact"] is None
    assert tried[1]["within_budget"] is True and tried[1]["kl_divergence"] <= 0.02
    assert rec["budget"]["chosen"] == "8bit-g32-act" and rec["bits"] == 8
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert not (cfg.run_dir / "gptq-2bit-g32-act").exists()  # rejected checkpoints are not kept
    alt = cfg.run_dir / "gptq-3bit-g32"
    qc = json.loads((alt / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["desc_act"]) == (3, False)


def test_bnb_baselines_compute_as_the_reference_does(tiny_base, tiny_adapter, tmp_path):
    """bitsandbytes' AVX512-BF16 CPU kernel computes in bf16 whatever the compute dtype; the NF4
    baselines must dequantize and multiply in float32 on CPU, as the reference does, or their KL
    mixes bf16 arithmetic into the rounding being measured."""
    import bitsandbytes as bnb

    from eval import baselines

    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path)
    dequantize.run(cfg)
    merge.run(cfg)
    verify.run(cfg)
    for name in ("bnb_nf4", "peft_4bit_merge"):
        model, _, _ = baselines.load(cfg, name, "cpu")
        lins = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert lins, name
        assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in lins), name
