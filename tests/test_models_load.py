"""pipeline.models.load_causal_lm reads local safetensors with pread, not a memory map: the model
must be the memory-mapped load's, bit for bit, on several architectures, sharded or not, quantized
on load or not; and no page of the checkpoint file may stay mapped into the process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import make_llama, tiny_config
from pipeline.models import bnb_config, disable_bnb_cpu_repacking, load_4bit_base, load_causal_lm


def _mapped(folder: Path) -> list[str]:
    """Lines of /proc/self/maps that map a file of ``folder``."""
    root = str(folder.resolve())
    with open("/proc/self/maps") as fh:
        return [line for line in fh if root in line]


def _gemma(folder: Path) -> Path:
    """A tiny Gemma-3 text model (tied, scaled embedding, soft-capped logits), bf16 on disk."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    cfg = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        final_logit_softcapping=30.0,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "kind,dtype",
    [("llama", torch.float32), ("llama-tied-bf16", torch.float32), ("llama-sharded", None), ("gemma3", torch.float32)],
)
def test_pread_load_equals_the_memory_mapped_load(tmp_path, tiny_base, tiny_adapter, kind, dtype):
    from transformers import AutoModelForCausalLM

    if kind == "llama":
        path = shutil.copytree(tiny_base, tmp_path / "m")  # a file no other test has mapped
    elif kind == "llama-tied-bf16":
        path = make_llama(tmp_path / "m", tie=True, dtype=torch.bfloat16)
    elif kind == "llama-sharded":
        src = AutoModelForCausalLM.from_pretrained(tiny_base)
        src.save_pretrained(tmp_path / "m", max_shard_size="100KB")
        path = tmp_path / "m"
        assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    else:
        path = _gemma(tmp_path / "m")
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs")
    ours = load_causal_lm(path, cfg, dtype=dtype)
    assert not _mapped(path), "the checkpoint file is still memory-mapped"
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval()
    assert ours.dtype == theirs.dtype
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == (
        theirs.get_output_embeddings().weight is theirs.get_input_embeddings().weight
    )
    ids = torch.randint(2, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_pread_load_quantized_on_load_equals_bitsandbytes_own(tmp_path, tiny_base, tiny_adapter):
    """The 4-bit base (the reference's) quantized on load: the same NF4 codes, quant states and
    logits as bitsandbytes through ``from_pretrained``'s own (memory-mapped) path."""
    from transformers import AutoModelForCausalLM

    base = shutil.copytree(tiny_base, tmp_path / "m")  # a file no other test has mapped
    cfg = tiny_config(base, tiny_adapter, tmp_path / "runs")
    ours = load_4bit_base(cfg, "cpu")
    assert not _mapped(base)
    theirs = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=bnb_config(cfg.dequantize)
    ).eval()
    disable_bnb_cpu_repacking(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])] == []
    ids = torch.randint(2, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
