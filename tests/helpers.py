"""Test helpers: tiny random models with a real (small) tokenizer, LoRA adapters for them, a
config for the tiny models, and :func:`run_stages`. Everything is built offline in seconds."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def make_tokenizer(vocab: int = 384):
    """A byte-level BPE tokenizer trained on pydoc text, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from pipeline.textdata import embedded_topics

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(embedded_topics("train")[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def make_llama(
    folder: Path,
    vocab: int = 384,
    hidden: int = 64,
    layers: int = 2,
    tie: bool = False,
    dtype=torch.float32,
    seed: int = 0,
    bias: bool = False,
) -> Path:
    """Save a random tiny LlamaForCausalLM (and tokenizer) at ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer(vocab)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        attention_bias=bias,
        mlp_bias=bias,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    # weights larger than the default init, so the LM is not near-uniform and KL is meaningful
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int = 1, resize_vocab: int | None = None, **lora_kwargs) -> Path:
    """Save a LoRA adapter with random, non-zero weights for ``base`` at ``folder``, as if trained:
    every trainable tensor (LoRA A/B, DoRA magnitudes, biases, modules_to_save copies) is moved.

    ``resize_vocab``: resize the base's embeddings to this many rows first (and save a
    tokenizer with the extra tokens beside the adapter), as training with added tokens does.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    kw.update(lora_kwargs)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    if resize_vocab:
        tok = AutoTokenizer.from_pretrained(base)
        tok.add_tokens([f"<extra_{i}>" for i in range(resize_vocab - len(tok))])
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[-8:].normal_(0, 0.15)
    pm = get_peft_model(model, LoraConfig(**kw))
    with torch.no_grad():  # of a scale comparable to W: the adapter must visibly move the model
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.05)
            elif "lora_magnitude" in n:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "lora_A" not in n and "lora_embedding_A" not in n:  # biases, modules_to_save copies
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(folder)
    if resize_vocab:
        tok.save_pretrained(folder)
    return folder


def tiny_config(base: Path, adapter: Path, run_root: Path, **sections):
    """A validated Config for the tiny model: fp32 everywhere, short texts, small GPTQ."""
    from pipeline.config import Config

    raw = {
        "base": {"path": str(base)},
        "adapter": {"path": str(adapter)},
        "output": {"dir": str(run_root), "run_name": "tiny"},
        "runtime": {"device": "cpu"},
        "dequantize": {"compute_dtype": "float32", "dtype": "float32"},
        "verify": {"seq_len": 128, "data": {"max_tokens": 512}},
        "requantize": {"bits": 4, "group_size": 32, "num_samples": 4, "seq_len": 128},
        "eval": {
            "seq_len": 128,
            "datasets": [{"name": "pydoc-heldout", "max_tokens": 512}],
            "tasks": ["pydoc_cloze"],
            "task_variants": ["all"],
            "task_limit": 8,
            "batch_size": 4,
        },
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return Config.model_validate(raw)


def run_stages(cfg, upto: str = "verify", first: str = "dequantize"):
    """Run the stages from ``first`` to ``upto`` (inclusive) in this process, in pipeline order;
    returns the last stage's artefact."""
    import importlib
    from pipeline.layout import STAGE_NAMES

    out = None
    for name in STAGE_NAMES[STAGE_NAMES.index(first) : STAGE_NAMES.index(upto) + 1]:
        out = importlib.import_module(f"pipeline.{name}").run(cfg)
    return out


def dequantize_model_whole(model, dtype):
    """The whole-model dequantization (``transformers``' ``PreTrainedModel.dequantize``, i.e.
    bitsandbytes' ``dequantize_4bit`` per ``Linear4bit``), as an independent oracle for the
    streamed reconstruction. GPT-2 ``Conv1D`` layers come back as ``nn.Linear`` [out, in]."""
    from pipeline.bnb4 import check_not_repacked

    check_not_repacked(model)
    return model.dequantize(dtype=dtype)
