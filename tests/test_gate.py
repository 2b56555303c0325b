"""The gate is independent of the merge and fails closed (issue 8).

The reference is what PEFT runs: the base loaded fresh in 4-bit and ``PeftModel.from_pretrained``,
nothing else (``pipeline.models.reference_model``). Every tied-embedding form PEFT supports must
merge to that model's distribution; a merge that gets the tie wrong, a NaN reference, activations
beyond float16 and the rest must be refused, with the reason named.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import REPO, make_adapter, make_llama, make_tokenizer, run_stages, tiny_config
from pipeline import merge, verify
from pipeline.checkpoint import Checkpoint
from pipeline.errors import InputError, VerificationError

QV = ["q_proj", "v_proj"]
# every way PEFT ties (or does not tie) an adapter to a tied lm_head:
# name: (LoRA kwargs, embed_tokens changes, lm_head changes, the merged checkpoint stays tied)
TIED_CASES = {
    "trainable_tokens": (dict(trainable_token_indices=[3, 5, 7, 11, 13, 17]), True, True, True),
    "trainable_tokens_embed": (dict(trainable_token_indices={"embed_tokens": [3, 5, 7]}), True, True, True),
    "trainable_tokens_different_sides": (
        dict(trainable_token_indices={"embed_tokens": [3, 5, 7], "lm_head": [9, 11]}),
        True,
        True,
        False,
    ),
    "trainable_tokens_lm_head_only": (dict(trainable_token_indices={"lm_head": [9, 11]}), False, True, False),
    "modules_to_save_ensure_tying": (
        dict(modules_to_save=["embed_tokens"], ensure_weight_tying=True),
        True,
        True,
        True,
    ),
    "lora_embed_ensure_tying": (dict(target_modules=QV + ["embed_tokens"], ensure_weight_tying=True), True, True, True),
    "lora_lm_head_ensure_tying": (dict(target_modules=QV + ["lm_head"], ensure_weight_tying=True), True, True, True),
    "modules_to_save_lm_head": (dict(modules_to_save=["lm_head"]), False, True, False),
    "lora_lm_head": (dict(target_modules=QV + ["lm_head"]), False, True, False),
    "lora_embed": (dict(target_modules=QV + ["embed_tokens"]), True, False, False),
    "lora_both": (dict(target_modules=QV + ["embed_tokens", "lm_head"]), True, True, False),
}


def kl_to_peft_on_dequantized(cfg) -> float:
    """Mean KL(PEFT unmerged || merged) per token on held-out text, float64, where PEFT runs the
    adapter unmerged on ``dequantized/`` (float32, loaded tied as the base is): an oracle free of
    bitsandbytes' forward, so a correct merge is at float round-off (~1e-12)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_tokenizer
    from pipeline.textdata import embedded_topics

    tok = load_tokenizer(cfg.layout.merged, cfg)
    ids = tok(embedded_topics("heldout")[0][:2000], return_tensors="pt").input_ids[:, :256]
    base = AutoModelForCausalLM.from_pretrained(cfg.layout.dequantized, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, cfg.effective_adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(cfg.layout.merged, dtype=torch.float32).eval()
    with torch.no_grad():
        p = ref(input_ids=ids).logits.double().log_softmax(-1)
        q = merged(input_ids=ids).logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("tied") / "base", tie=True)


@pytest.mark.parametrize("name", list(TIED_CASES))
def test_every_tied_form_merges_to_what_peft_runs(name, tied_base, tmp_path):
    kw, embed_changes, head_changes, stays_tied = TIED_CASES[name]
    adapter = make_adapter(tied_base, tmp_path / "a", **{"target_modules": QV, **kw})
    cfg = tiny_config(tied_base, adapter, tmp_path / "runs", merge={"compare_bases": False})
    run_stages(cfg, upto="verify")
    rec = json.loads(cfg.layout.record("verify").read_text())
    assert rec["passed"], rec["problems"]
    assert rec["kl_divergence"] < 1e-6  # against PeftModel on the 4-bit base (bnb's fp32 forward: floor ~5e-8)
    assert kl_to_peft_on_dequantized(cfg) < 1e-10  # the same float weights, PEFT unmerged: round-off only
    merged = Checkpoint(cfg.layout.merged)
    assert merged.config["tie_word_embeddings"] is stays_tied
    assert ("lm_head.weight" in merged.tensors) is (not stays_tied)
    dequantized = Checkpoint(cfg.layout.dequantized)
    w = dequantized.get("model.embed_tokens.weight")
    emb = merged.get("model.embed_tokens.weight")
    head = emb if stays_tied else merged.get("lm_head.weight")
    assert (not torch.equal(emb, w)) is embed_changes
    assert (not torch.equal(head, w)) is head_changes


def test_a_wrong_tie_in_the_merge_is_refused(tied_base, tmp_path):
    """Plant the classic mistake (the lm_head's LoRA delta leaking into the tied embedding, as PEFT's
    merge_and_unload does on a tied model): the gate, built without the merge code, must refuse it."""
    adapter = make_adapter(tied_base, tmp_path / "a", target_modules=QV + ["lm_head"])
    cfg = tiny_config(tied_base, adapter, tmp_path / "runs", merge={"compare_bases": False})
    run_stages(cfg, upto="merge")
    f = cfg.layout.candidate("dequantized") / "model.safetensors"
    sd = load_file(f)
    sd["model.embed_tokens.weight"] = sd["lm_head.weight"].clone()  # a wrong tie: both sides get W + delta
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="not exact"):
        verify.run(cfg)
    assert not cfg.layout.merged.exists() and cfg.layout.rejected("dequantized").is_dir()


def _overflowing_base(folder, scale: float = 150.0):
    """A tiny bf16 Llama whose layer-0 MLP (up and down projections) is scaled by ``scale``: weights
    stay within float16 (|w| <= 2e3) but the residual stream reaches ~1e5 (scale 100: 7.3e4)."""
    base = make_llama(folder, dtype=torch.bfloat16)
    f = base / "model.safetensors"
    sd = load_file(f)
    for k in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        sd[k] = (sd[k].float() * scale).clamp(-2000, 2000).to(torch.bfloat16)
    save_file(sd, f, metadata={"format": "pt"})
    return base


def test_float16_activations_out_of_range_are_refused(tmp_path):
    """Weights fit float16 (|w| <= 2e3) but activations reach ~1e5: a float16 checkpoint would give
    inf/NaN. Verify runs float32 on CPU, so it must check the range itself, naming the layer."""
    base = _overflowing_base(tmp_path / "b")
    adapter = make_adapter(base, tmp_path / "a")
    cfg = tiny_config(base, adapter, tmp_path / "runs", dequantize={"dtype": "float16"}, merge={"compare_bases": False})
    run_stages(cfg, upto="merge")
    with pytest.raises(
        VerificationError,
        match=r"leave the float16 range: module 'model\.layers\.0\.\S+' outputs "
        r".*Set dequantize.dtype: bfloat16",
    ):
        verify.run(cfg)


def test_nan_reference_fails_closed_with_exit_3(tmp_path):
    """float16 compute on activations that overflow: the reference's logits are NaN. The gate must
    say so and exit 3, not pass on `NaN > bound` being False."""
    base = _overflowing_base(tmp_path / "b")
    adapter = make_adapter(base, tmp_path / "a")
    cfg = tiny_config(
        base,
        adapter,
        tmp_path / "runs",
        dequantize={"compute_dtype": "float16", "dtype": "bfloat16"},
        merge={"compare_bases": False},
        requantize={"enabled": False},
        eval={"tasks": []},
    )
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(f)], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 3, r.stderr[-2000:]
    assert "non-finite" in r.stderr and "reference" in r.stderr
    assert not cfg.layout.merged.exists()
    rec = json.loads(cfg.layout.record("verify").read_text())
    assert rec["passed"] is False


def test_within_fails_closed():
    from pipeline.common import within

    assert within(0.5, 1.0) and not within(1.5, 1.0)
    assert not within(float("nan"), 1.0) and not within(float("inf"), 1.0)


def _chat_tokenizer(eos: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.textdata import embedded_topics

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(embedded_topics("train")[:20], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token=eos,
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def test_generation_settings_follow_the_training_tokenizer(tmp_path):
    """The base stops at </s> (id 1) with sampling settings; training saved a ChatML tokenizer whose
    EOS is <|im_end|> (id 3). Merged and GPTQ checkpoints must stop at both: eos_token_id [1, 3]."""
    from transformers import GenerationConfig

    base = make_llama(tmp_path / "b")
    _chat_tokenizer("</s>").save_pretrained(base)
    GenerationConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, do_sample=True, temperature=0.6, top_p=0.9
    ).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "a")
    chat = _chat_tokenizer("<|im_end|>")
    chat.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    chat.save_pretrained(adapter)
    assert chat.eos_token_id == 3
    cfg = tiny_config(base, adapter, tmp_path / "runs", merge={"compare_bases": False})
    run_stages(cfg, upto="requantize")
    for folder in (cfg.layout.merged, cfg.layout.gptq):
        gen = json.loads((folder / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [1, 3], folder
        assert gen["do_sample"] is True and gen["temperature"] == 0.6 and gen["top_p"] == 0.9  # kept
        assert json.loads((folder / "config.json").read_text())["eos_token_id"] == [1, 3]


def test_gptq_checkpoint_is_float16(tiny_base, tiny_adapter, tmp_path):
    """GPTQ checkpoints are half precision: config.json and every unquantized tensor (GPTQModel on
    CPU works in float32 and would write float32)."""
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs", merge={"compare_bases": False})
    run_stages(cfg, upto="requantize")
    assert json.loads((cfg.layout.gptq / "config.json").read_text())["dtype"] == "float16"
    g = Checkpoint(cfg.layout.gptq)
    floats = {k: t.dtype for k, t in g.tensors.items() if t.dtype in ("F16", "BF16", "F32", "F64")}
    assert floats and set(floats.values()) == {"F16"}, {k: v for k, v in floats.items() if v != "F16"}
    assert any(k.endswith(".qweight") for k in g.tensors)


def _moe_base(folder):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer(384)
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_lora_on_moe_expert_parameters(tmp_path):
    """LoRA on MoE experts (target_parameters), as MoE fine-tunes are trained now: merged exactly,
    written with the base checkpoint's per-expert keys, and reloaded by transformers."""
    base = _moe_base(tmp_path / "moe")
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in Checkpoint(base).tensors)  # per-expert keys
    adapter = make_adapter(
        base,
        tmp_path / "a",
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    cfg = tiny_config(base, adapter, tmp_path / "runs", merge={"compare_bases": False})
    run_stages(cfg, upto="verify")
    rec = json.loads(cfg.layout.record("verify").read_text())
    assert rec["passed"], rec["problems"]
    assert rec["kl_divergence"] < 1e-6
    assert kl_to_peft_on_dequantized(cfg) < 1e-10
    merged = Checkpoint(cfg.layout.merged)
    assert set(merged.tensors) == set(Checkpoint(base).tensors)  # the base's own key layout
    d = Checkpoint(cfg.layout.dequantized)
    k = "model.layers.0.mlp.experts.1.down_proj.weight"
    assert not torch.equal(merged.get(k), d.get(k))  # the expert was adapted


def test_lora_bias_on_a_base_without_biases_is_refused_early(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "a", lora_bias=True)
    cfg = tiny_config(tiny_base, adapter, tmp_path / "runs")
    with pytest.raises(InputError, match=r"trained with lora_bias=True.*base has no bias"):
        merge.run(cfg)
    assert not list(cfg.run_dir.glob("merged*"))


def test_resized_vocabulary_without_rows_names_the_fix(tiny_base, tmp_path):
    """Training grew the vocabulary and saved the tokenizer, but not the embedding rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft import LoraConfig, get_peft_model

    m = AutoModelForCausalLM.from_pretrained(tiny_base)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.add_tokens([f"<new_{i}>" for i in range(8)])
    m.resize_token_embeddings(len(tok))
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    tok.save_pretrained(tmp_path / "a")
    cfg = tiny_config(tiny_base, tmp_path / "a", tmp_path / "runs")
    with pytest.raises(
        InputError,
        match=r"tokenizer has 392 tokens but the base only 384 embedding rows.*"
        r"save_embedding_layers=True",
    ):
        merge.run(cfg)
