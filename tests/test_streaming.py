"""The streamed, one-tensor-at-a-time path equals the whole-model path it replaced (issue 10):

* the 4-bit base rebuilt per tensor (``pipeline.bnb4.BaseTensors``) equals ``transformers``'
  load-in-4bit followed by bitsandbytes' ``dequantize_4bit``, bit for bit;
* the streamed merge equals PEFT's ``merge_and_unload`` on the whole dequantized model: identical
  in float32, within 1 ulp in float16 / bfloat16;
* a sharded base (with its index) merges as the unsharded one, into size-capped shards;
* scoring one decoder layer at a time equals the whole-model forward.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import dequantize_model_whole, make_adapter, make_llama, run_stages, tiny_config
from pipeline.bnb4 import BaseTensors
from pipeline.checkpoint import Checkpoint
from pipeline.models import load_4bit_base

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "quant_type,double_quant,compute,storage",
    [
        ("nf4", True, "float32", "uint8"),
        ("nf4", False, "bfloat16", "uint8"),
        ("fp4", True, "float16", "bfloat16"),
    ],
)
def test_rebuilt_4bit_base_equals_transformers_load(base_dtype, quant_type, double_quant, compute, storage, tmp_path):
    import bitsandbytes as bnb

    base = make_llama(tmp_path / "b", dtype=base_dtype, tie=True)
    deq = dict(quant_type=quant_type, double_quant=double_quant, compute_dtype=compute, quant_storage=storage)
    cfg = tiny_config(base, base, tmp_path / "runs", dequantize=deq)
    rebuilt = BaseTensors(Checkpoint(base), cfg)
    model = load_4bit_base(cfg, "cpu")
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            want = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            assert torch.equal(rebuilt.get(f"{name}.weight"), want), name
            n += 1
    assert n == 14
    state = model.state_dict()
    for name in rebuilt.targets:  # never quantized: the checkpoint as training loaded it
        if not rebuilt.quantized(name):
            assert torch.equal(rebuilt.get(name), state[name].float()), name


def test_a_base_saved_in_4bit_is_rebuilt_from_its_own_quant_state(tiny_base, tmp_path):
    import bitsandbytes as bnb

    cfg = tiny_config(tiny_base, tiny_base, tmp_path / "runs")
    load_4bit_base(cfg, "cpu").save_pretrained(tmp_path / "b4")
    cfg4 = tiny_config(tmp_path / "b4", tiny_base, tmp_path / "runs")
    rebuilt = BaseTensors(Checkpoint(tmp_path / "b4"), cfg4)
    model = load_4bit_base(cfg4, "cpu")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14
    for name, m in layers.items():
        want = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        assert torch.equal(rebuilt.get(f"{name}.weight"), want), name


def _whole_model_merge(cfg, adapter, dtype):
    """The oracle: transformers' load-in-4bit, ``dequantize`` (whole model, float32), PEFT's
    ``merge_and_unload``, one cast."""
    from peft import PeftModel

    model = dequantize_model_whole(load_4bit_base(cfg, "cpu"), torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().to(dtype).state_dict()


@pytest.mark.parametrize(
    "name,kw",
    [
        ("plain", {}),
        ("rslora", dict(use_rslora=True, r=16, lora_alpha=8)),
        ("rank_alpha_pattern", dict(rank_pattern={"q_proj": 2, "down_proj": 16}, alpha_pattern={"v_proj": 64})),
        ("dora", dict(use_dora=True)),
        ("modules_to_save", dict(modules_to_save=["lm_head", "norm"])),
        ("lora_on_embeddings", dict(target_modules=ALL_LINEAR + ["embed_tokens", "lm_head"])),
    ],
)
@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
def test_streamed_merge_equals_whole_model_merge(name, kw, out_dtype, tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / name, **kw)
    cfg = tiny_config(
        tiny_base,
        adapter,
        tmp_path / "runs",
        dequantize={"dtype": out_dtype, "save": False},
        merge={"compare_bases": False},
    )
    run_stages(cfg, upto="merge", first="merge")
    merged = Checkpoint(cfg.layout.candidate("dequantized"))
    want = _whole_model_merge(cfg, adapter, getattr(torch, out_dtype))
    assert set(merged.tensors) == set(want)
    for k, w in want.items():
        got = merged.get(k)
        assert got.dtype == w.dtype, k
        if out_dtype == "float32":
            assert torch.equal(got, w), k
        else:  # one rounding each from the same float32 values: at most one unit in the last place
            ulp = torch.finfo(w.dtype).eps * w.float().abs().clamp_min(torch.finfo(w.dtype).tiny)
            assert ((got.float() - w.float()).abs() <= ulp).all(), k


def test_sharded_base_and_sharded_output(tmp_path):
    """A base in several shards (with model.safetensors.index.json) merges exactly as the same base
    in one file; a small shard cap writes the merged model in several shards plus an index."""
    from transformers import AutoModelForCausalLM

    one = make_llama(tmp_path / "one")
    AutoModelForCausalLM.from_pretrained(one).save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    (tmp_path / "sharded" / "tokenizer.json").write_bytes((one / "tokenizer.json").read_bytes())
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (one / f).is_file():
            (tmp_path / "sharded" / f).write_bytes((one / f).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    adapter = make_adapter(one, tmp_path / "a")
    outs = {}
    for name in ("one", "sharded"):
        cfg = tiny_config(
            tmp_path / name,
            adapter,
            tmp_path / f"runs-{name}",
            merge={"compare_bases": False},
            runtime={"device": "cpu", "shard_size_gb": 0.0001},
        )
        run_stages(cfg, upto="merge", first="merge")
        outs[name] = Checkpoint(cfg.layout.candidate("dequantized"))
    index = json.loads((outs["sharded"].folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the 100 kB cap: several shards
    assert set(outs["one"].tensors) == set(outs["sharded"].tensors)
    for k in outs["one"].tensors:
        assert torch.equal(outs["one"].get(k), outs["sharded"].get(k)), k
    reloaded = AutoModelForCausalLM.from_pretrained(outs["sharded"].folder)
    assert torch.equal(
        reloaded.state_dict()["model.layers.1.mlp.down_proj.weight"],
        outs["one"].get("model.layers.1.mlp.down_proj.weight"),
    )


@pytest.mark.parametrize("tie", [False, True])
def test_layerwise_scoring_equals_the_whole_model(tie, tmp_path):
    """Verify and evaluate run one decoder layer at a time when a model does not fit: the per-window
    NLL and the KL must match the whole-model forward (within 1e-6 and 1e-7)."""
    from eval.metrics import score
    from pipeline.layerwise import plain_lm, reference_lm
    from pipeline.models import load_causal_lm, load_tokenizer, reference_model
    from pipeline.textdata import text_windows

    base = make_llama(tmp_path / "b", tie=tie)
    adapter = make_adapter(base, tmp_path / "a", **({"target_modules": ["q_proj", "v_proj", "lm_head"]} if tie else {}))
    cfg = tiny_config(base, adapter, tmp_path / "runs")
    wins = text_windows(load_tokenizer(base, cfg), cfg.verify.data, 128, "verify.data", role="verify")
    whole = score(load_causal_lm(base, cfg, dtype=torch.float32), wins, ref=reference_model(cfg, adapter, "cpu"))
    layered = score(plain_lm(base, cfg, torch.float32), wins, ref=reference_lm(cfg, adapter))
    assert abs(whole["nll_per_window"] - layered["nll_per_window"]).max() < 1e-6
    assert abs(whole["ref_nll_per_window"] - layered["ref_nll_per_window"]).max() < 1e-6
    assert abs(whole["kl_divergence"] - layered["kl_divergence"]) < 1e-7
    assert whole["kl_divergence"] > 1e-3  # the adapter moved the model: the comparison is not vacuous


def test_verify_one_layer_at_a_time(tiny_base, tiny_adapter, tmp_path):
    """runtime.offload: on runs the gate one decoder layer at a time, with the same verdict and KL."""
    recs = {}
    for mode in ("off", "on"):
        cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / mode, runtime={"device": "cpu", "offload": mode})
        run_stages(cfg, upto="verify")
        recs[mode] = json.loads(cfg.layout.record("verify").read_text())
    assert recs["on"]["layerwise"] is True and recs["off"]["layerwise"] is False
    assert recs["on"]["passed"] and recs["off"]["passed"]
    assert abs(recs["on"]["kl_divergence"] - recs["off"]["kl_divergence"]) < 1e-7
    assert abs(recs["on"]["reference_perplexity"] / recs["off"]["reference_perplexity"] - 1) < 1e-6
