"""Every adapter variant people ship merges exactly: the merged model's next-token distribution
equals the unmerged reference (4-bit base + adapter) within stated bounds.

Bounds, fp32 output and fp32 compute: mean KL < 1e-6 nats/token and max |logit difference|
< 1e-3. With a half-precision compute dtype the reference itself computes in that dtype, so
the bound is the verify stage's default for it (bf16: 1e-2, fp16: 1e-3)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_adapter, make_llama, run_stages, tiny_config
from pipeline import dequantize, merge, verify
from pipeline.models import reference_model
from pipeline.models import load_4bit_base
from pipeline.errors import VerificationError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def merge_and_verify(base, adapter, root, **sections) -> dict:
    cfg = tiny_config(base, adapter, root, **sections)
    run_stages(cfg, upto="verify")
    return cfg, json.loads(cfg.layout.record("verify").read_text())


def max_logit_diff(cfg) -> float:
    """max |logits(reference) - logits(merged)| on a held-out snippet."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.run_dir / "merged")
    ids = tok("The for statement is used to iterate over the elements of a sequence", return_tensors="pt").input_ids
    ref = reference_model(cfg, cfg.effective_adapter, "cpu")
    m = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        return (ref(input_ids=ids).logits - m(input_ids=ids).logits).abs().max().item()


def assert_exact(cfg, rec, kl=1e-6, logit=1e-3):
    assert rec["passed"], rec["problems"]
    assert rec["kl_divergence"] < kl
    assert max_logit_diff(cfg) < logit


@pytest.mark.parametrize(
    "name,kw",
    [
        ("rslora", dict(use_rslora=True, r=16, lora_alpha=8)),
        ("rank_alpha_pattern", dict(rank_pattern={"q_proj": 2, "down_proj": 16}, alpha_pattern={"v_proj": 64})),
        ("dora", dict(use_dora=True)),
        ("modules_to_save", dict(modules_to_save=["lm_head", "norm"])),
        ("lora_on_embeddings", dict(target_modules=ALL_LINEAR + ["embed_tokens", "lm_head"])),
    ],
)
def test_variant_merges_exactly(name, kw, tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / name, **kw)
    cfg, rec = merge_and_verify(tiny_base, adapter, tmp_path / "runs")
    assert_exact(cfg, rec)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_variants(bias, tmp_path):
    base = make_llama(tmp_path / "base", bias=True)
    adapter = make_adapter(base, tmp_path / "a", bias=bias)
    assert any(".bias" in k for k in load_file(adapter / "adapter_model.safetensors"))
    cfg, rec = merge_and_verify(base, adapter, tmp_path / "runs")
    assert_exact(cfg, rec)


def test_rslora_merged_with_plain_scaling_is_rejected(tiny_base, tmp_path):
    """A tool that ignores rsLoRA (alpha/r instead of alpha/sqrt(r)) is caught by the gate."""
    adapter = make_adapter(tiny_base, tmp_path / "rs", use_rslora=True, r=16, lora_alpha=8)
    cfg = tiny_config(tiny_base, adapter, tmp_path / "runs")
    deq = dequantize.run(cfg)
    out = merge.run(cfg)[0]  # merged-dequantized.unverified
    w, base = load_file(out / "model.safetensors"), load_file(deq / "model.safetensors")
    wrong = 1 / 16**0.5  # (alpha / r) / (alpha / sqrt(r)): the naive delta is this much of the right one
    broken = {
        k: base[k] + wrong * (v - base[k]) if k in base and not torch.equal(v, base[k]) else v for k, v in w.items()
    }
    save_file(broken, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="not exact"):
        verify.run(cfg)


@pytest.mark.parametrize("target", ["lora_head", "save_head", "save_embed"])
def test_tied_embeddings(target, tmp_path):
    """Tied input/output embeddings: an adapter that changes one side unties them, and the
    saved checkpoint reloads with the trained side intact (not re-tied over)."""
    from transformers import AutoModelForCausalLM

    base = make_llama(tmp_path / "base", tie=True)
    kw = {
        "lora_head": dict(target_modules=ALL_LINEAR + ["lm_head"]),
        "save_head": dict(modules_to_save=["lm_head"]),
        "save_embed": dict(modules_to_save=["embed_tokens"]),
    }[target]
    adapter = make_adapter(base, tmp_path / "a", **kw)
    cfg, rec = merge_and_verify(base, adapter, tmp_path / "runs")
    assert_exact(cfg, rec)
    merged_cfg = json.loads((cfg.run_dir / "merged" / "config.json").read_text())
    assert merged_cfg["tie_word_embeddings"] is False
    m = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "merged")
    assert not torch.equal(m.get_input_embeddings().weight, m.get_output_embeddings().weight)


def test_tied_embeddings_stay_tied_when_untouched(tmp_path):
    base = make_llama(tmp_path / "base", tie=True)
    adapter = make_adapter(base, tmp_path / "a")
    cfg, rec = merge_and_verify(base, adapter, tmp_path / "runs")
    assert_exact(cfg, rec)
    assert json.loads((cfg.run_dir / "merged" / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("rows", [392, 376])
def test_resized_vocabulary(rows, tiny_base, tmp_path):
    """Adapter trained with more (or fewer) embedding rows than the base: the base is resized,
    vocab_size updated, and the tokenizer comes from the adapter folder."""
    from transformers import AutoTokenizer

    adapter = make_adapter(
        tiny_base,
        tmp_path / "a",
        resize_vocab=rows if rows > 384 else None,
        modules_to_save=["embed_tokens", "lm_head"],
    )
    if rows < 384:  # shrink: the adapter's embedding copies and its tokenizer have fewer rows
        t = load_file(adapter / "adapter_model.safetensors")
        t = {k: v[:rows] if ("embed_tokens" in k or "lm_head" in k) and v.shape[0] == 384 else v for k, v in t.items()}
        save_file(t, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
        from helpers import make_tokenizer

        make_tokenizer(rows).save_pretrained(adapter)
    cfg, rec = merge_and_verify(tiny_base, adapter, tmp_path / "runs", eval={"tasks": []})
    assert rec["passed"], rec["problems"]
    assert rec["kl_divergence"] < 1e-6
    merged_cfg = json.loads((cfg.run_dir / "merged" / "config.json").read_text())
    assert merged_cfg["vocab_size"] == rows
    assert len(AutoTokenizer.from_pretrained(cfg.run_dir / "merged")) == rows


@pytest.mark.parametrize(
    "quant_type,double_quant,compute,storage",
    [
        ("nf4", True, "float32", "uint8"),
        ("nf4", False, "float32", "uint8"),
        ("fp4", True, "float32", "uint8"),
        ("fp4", False, "float32", "bfloat16"),
        ("nf4", True, "bfloat16", "uint8"),
        ("nf4", True, "float16", "bfloat16"),
    ],
)
def test_4bit_settings(quant_type, double_quant, compute, storage, tiny_base, tiny_adapter, tmp_path):
    deq = dict(quant_type=quant_type, double_quant=double_quant, compute_dtype=compute, quant_storage=storage)
    cfg, rec = merge_and_verify(tiny_base, tiny_adapter, tmp_path / "runs", dequantize=deq)
    bound = {"float32": 1e-6, "bfloat16": 1e-2, "float16": 1e-3}[compute]
    assert rec["passed"], rec["problems"]
    assert rec["kl_divergence"] < bound
    # the weights are exact whatever the compute dtype: W_deq + scaling * B @ A
    import bitsandbytes as bnb

    q = load_4bit_base(cfg, "cpu").model.layers[0].self_attn.q_proj
    w_deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    lora = load_file(tiny_adapter / "adapter_model.safetensors")
    a = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    merged = load_file(cfg.run_dir / "merged" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(merged, w_deq + 2.0 * (b @ a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,density", [("linear", None), ("ties", 0.5), ("dare_linear", 0.7)])
def test_combined_adapters(method, density, tiny_base, tmp_path):
    a1 = make_adapter(tiny_base, tmp_path / "a1", seed=1)
    a2 = make_adapter(tiny_base, tmp_path / "a2", seed=2)
    cfg = tiny_config(tiny_base, a1, tmp_path / "runs")
    raw = cfg.model_dump(mode="json")
    raw["adapter"] = {
        "combine": {
            "adapters": [{"path": str(a1), "weight": 0.7}, {"path": str(a2), "weight": 0.3}],
            "method": method,
            **({"density": density} if density else {}),
        }
    }
    from pipeline.config import Config

    cfg = Config.model_validate(raw)
    run_stages(cfg, upto="verify")
    rec = json.loads(cfg.layout.record("verify").read_text())
    assert_exact(cfg, rec)
    combined = load_file(cfg.run_dir / "adapter-combined" / "adapter_model.safetensors")
    single = load_file(a1 / "adapter_model.safetensors")
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not torch.equal(combined[k], single[k])  # really a combination


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    """GPT-2 style Conv1D layers (weight [in, out]) with a fan_in_fan_out adapter: bitsandbytes
    turns them into Linear4bit, dequantization turns them back into Conv1D, PEFT merges."""
    from helpers import make_tokenizer
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    tok = make_tokenizer(384)
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=1)
    ).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    adapter = make_adapter(
        tmp_path / "gpt2", tmp_path / "a", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    cfg, rec = merge_and_verify(tmp_path / "gpt2", adapter, tmp_path / "runs")
    assert_exact(cfg, rec)
    m = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "merged")
    assert isinstance(m.transformer.h[0].attn.c_attn, Conv1D) and m.transformer.h[0].attn.c_attn.weight.shape == (
        64,
        192,
    )
