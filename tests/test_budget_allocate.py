"""The quality budget with per-module allocation, on the tiny model: a setting over budget is tried
with its most sensitive modules in 16-bit; the smallest checkpoint within budget is published and
reloads in plain transformers with the bits its record lists."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_config
from pipeline import allocate, dequantize, merge, requantize, verify
from pipeline.errors import VerificationError


@pytest.fixture(scope="module")
def verified(tiny_base, tiny_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-alloc")
    cfg = tiny_config(tiny_base, tiny_adapter, root)
    for stage in (dequantize, merge, verify):
        stage.run(cfg)
    return cfg


def _with_budget(cfg, budget):
    rq = cfg.requantize.model_copy(update={"budget": None})
    from pipeline.config import BudgetSection

    return cfg.model_copy(update={"requantize": rq.model_copy(update={"budget": BudgetSection(**budget)})})


def test_budget_allocation_publishes_the_smallest_checkpoint_within_budget(verified):
    from transformers import AutoModelForCausalLM

    # the 4-bit KL on the verify text, from a budget nothing meets (the record is written anyway)
    probe = _with_budget(verified, {"max_kl": 1e-9, "settings": [{"bits": 4}]})
    with pytest.raises(VerificationError):
        requantize.run(probe)
    rec = json.loads(probe.layout.record("requantize").read_text())
    kl4 = rec["budget"]["tried"][0]["kl_divergence"]
    assert kl4 > 1e-4
    # a budget between 4-bit and 8-bit: 4-bit is over; its allocation keeps modules in 16-bit
    cfg = _with_budget(
        verified,
        {
            "max_kl": 0.5 * kl4,
            "settings": [{"bits": 8}, {"bits": 4}],
            "allocate": {"sensitivity": "kl", "windows": 2, "max_fp16_fraction": 1.0, "tries": 3},
            "keep_tries": True,
        },
    )
    out = requantize.run(cfg)
    rec = json.loads(cfg.layout.record("requantize").read_text())
    tried = rec["budget"]["tried"]
    assert tried[0]["tag"] == "4bit-g32-act" and not tried[0]["within_budget"]
    mixed = [t for t in tried if t.get("fp16_modules")]
    assert mixed and all(t["tag"].startswith("4bit-g32-act-keep") for t in mixed)
    for t in mixed:
        assert len(t["module_bits"]) == 14 and sorted(m for m, b in t["module_bits"].items() if b == 16) == sorted(
            t["fp16_modules"]
        )
        assert 0 < t["predicted_remaining_share"] < 1 and t["sensitivity"] == "kl"
        assert t["bits_per_weight"] > 4 + 20 / 32
    within = [t for t in tried if t["within_budget"]]
    assert within and all(t["kl_divergence"] <= 0.5 * kl4 for t in within)
    best = min(within, key=lambda t: t["size_bytes"])
    assert best["chosen"] and sum(t["chosen"] for t in tried) == 1 and rec["budget"]["chosen"] == best["tag"]
    assert rec["tag"] == best["tag"] and best["artefact"] == str(out)
    # every try kept (keep_tries) and evaluable; the published one reloads with the listed bits
    assert all(t["artefact"] for t in tried)
    listed = best.get("module_bits") or {m: best["bits"] for m in allocate.module_bits(out)}
    assert allocate.module_bits(out) == listed
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    mods = dict(model.named_modules())
    for name, b in listed.items():
        assert (type(mods[name]) is torch.nn.Linear) == (b == 16), name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(5, 40)[None]).logits).all()


def test_allocation_from_gptq_losses_needs_no_probes(verified):
    verified.layout.clear("requantize")  # as `run` does before the stage: the last test kept its tries
    cfg = _with_budget(
        verified,
        {
            "max_kl": 1e-9,
            "settings": [{"bits": 4}],
            "allocate": {"sensitivity": "gptq_loss", "max_fp16_fraction": 0.3, "tries": 1},
        },
    )
    with pytest.raises(VerificationError, match="no GPTQ setting is within the quality budget"):
        requantize.run(cfg)
    rec = json.loads(cfg.layout.record("requantize").read_text())
    tried = rec["budget"]["tried"]
    assert len(tried) == 2 and tried[1]["sensitivity"] == "gptq_loss" and tried[1]["sensitivity_seconds"] < 5
    # the byte cap holds: at most 30% of the extra 16-bit bytes
    from pipeline.checkpoint import Checkpoint

    names = list(tried[1]["module_bits"])
    cost = allocate.extra_bytes_fp16(Checkpoint(cfg.layout.merged).shapes(), 4, 32, names)
    assert tried[1]["fp16_modules"] and sum(cost[m] for m in tried[1]["fp16_modules"]) <= 0.3 * sum(cost.values())
    assert tried[1]["artefact"] is None and not list(cfg.run_dir.glob("gptq-*"))  # nothing over budget is kept
