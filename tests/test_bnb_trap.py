"""bitsandbytes 0.50 repacks Linear4bit weights into a CPU layout on the first eval-mode
forward (CPUs with AVX512-BF16); dequantizing such a weight returns garbage with no error,
and bnb's inverse of the repacking is lossy. The pipeline must never dequantize one."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu

from helpers import tiny_config
from pipeline.models import load_4bit_base
from helpers import dequantize_model_whole as dequantize_model
from pipeline.errors import InputError


def _weights(model) -> dict:
    return {n: m.weight.detach().float().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_eval_forward_does_not_change_the_dequantized_weights(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path)
    fresh = _weights(dequantize_model(load_4bit_base(cfg, "cpu"), torch.float32))
    used = load_4bit_base(cfg, "cpu").eval()
    with torch.no_grad():  # the forward that repacks on AVX512-BF16 CPUs
        used(input_ids=torch.arange(16)[None])
    after = _weights(dequantize_model(used, torch.float32))
    assert fresh.keys() == after.keys() and len(fresh) == 15  # 14 projections + lm_head
    for k in fresh:
        torch.testing.assert_close(after[k], fresh[k], rtol=0, atol=0)


def test_repacked_weights_are_refused(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path)
    model = load_4bit_base(cfg, "cpu")
    m = model.model.layers[1].mlp.up_proj
    # what bnb's forward does on an AVX512-BF16 CPU, forced here on any CPU
    m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    naive = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
    fresh = load_4bit_base(cfg, "cpu").model.layers[1].mlp.up_proj
    truth = bnb.functional.dequantize_4bit(fresh.weight.data, fresh.weight.quant_state)
    assert naive.shape != truth.shape or not torch.equal(naive, truth)  # the trap is real
    with pytest.raises(InputError, match="model.layers.1.mlp.up_proj.*repacked"):
        dequantize_model(model, torch.float32)
