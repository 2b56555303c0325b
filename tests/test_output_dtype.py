"""Output dtype: the base's own dtype unless the config says otherwise; a merge that
overflows float16 stops with the layer's name and the bf16 suggestion."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_adapter, make_llama, tiny_config
from pipeline import dequantize, merge
from pipeline.errors import InputError


@pytest.mark.parametrize("base_dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_default_output_dtype_is_the_bases(base_dtype, name, tmp_path):
    base = make_llama(tmp_path / "base", dtype=base_dtype)
    adapter = make_adapter(base, tmp_path / "a")
    cfg = tiny_config(base, adapter, tmp_path / "runs", dequantize={"dtype": None})
    assert cfg.out_dtype == name
    dequantize.run(cfg)
    (out,) = [p for p in merge.run(cfg) if p.name.startswith("merged-dequantized")]
    w = load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == base_dtype
    assert json.loads((out / "config.json").read_text())["dtype"] == name


def test_float16_overflow_names_the_layer(tmp_path):
    base = make_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a")
    t = load_file(adapter / "adapter_model.safetensors")
    k = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    t[k] = t[k] * 1e6  # a delta far beyond float16's 65504
    save_file(t, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = tiny_config(base, adapter, tmp_path / "runs", dequantize={"dtype": "float16"})
    dequantize.run(cfg)
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*float16.*bfloat16"):
        merge.run(cfg)
    assert not list(cfg.run_dir.glob("merged*"))
