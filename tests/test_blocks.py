"""Scoring in row blocks (``eval.metrics.window_blocks``): the decoder runs once, the head runs on
``rows`` positions at a time, so a window's logits are never whole in memory. The blocks must
equal the model's own full log-probs: plain and tied heads, a PEFT model with LoRA on the head,
Gemma's logit soft-capping, and a model whose forward does something the decomposition does not
know (it must fall back to the full logits, not return different numbers)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_adapter, make_llama

from eval.metrics import score, window_blocks
from pipeline.layerwise import logprobs_from_logits


def _full(model, w):
    with torch.no_grad():
        return logprobs_from_logits(model(input_ids=w[None]).logits[0, :-1])


class Forwards:
    """Counts the model's forward calls (the decomposition runs it once, the fallback twice)."""

    def __init__(self, model):
        self.n = 0
        model.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


def _check(model, rows=7, once=True):
    w = torch.randint(2, 300, (40,), generator=torch.Generator().manual_seed(0))
    calls = Forwards(model)
    blocks = list(window_blocks(model, w, rows=rows))
    assert [b.shape[0] for b in blocks] == [7, 7, 7, 7, 7, 4]
    assert calls.n == (1 if once else 2)
    got, want = torch.cat(blocks), _full(model, w)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_blocks_equal_the_full_logprobs(tie, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / "b", tie=tie)).eval()
    _check(model)


def test_blocks_of_a_peft_model_with_lora_on_the_head(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_llama(tmp_path / "b")
    adapter = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "v_proj", "lm_head"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    _check(model)
    w = torch.arange(2, 42)
    on = torch.cat(list(window_blocks(model, w)))
    with model.disable_adapter():
        off = torch.cat(list(window_blocks(model, w)))
    assert (on - off).abs().max() > 1e-2  # the adapter (on the head too) is in the blocks


def test_blocks_apply_gemma_soft_capping(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=0.5,  # small: capping visibly changes the distribution
    )
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    _check(model)


def test_unknown_post_processing_falls_back_to_the_full_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / "b")).eval()
    forward = model.forward

    def doubled(*args, **kwargs):  # something the decomposition does not know
        out = forward(*args, **kwargs)
        out.logits = 2 * out.logits
        return out

    model.forward = doubled
    _check(model, once=False)


def test_score_in_blocks_equals_score_on_whole_windows(tmp_path):
    """Lockstep scoring with the blocks gives the same perplexity, KL and top-1 as scoring each
    window's full log-probs (rows = the window)."""
    from transformers import AutoModelForCausalLM

    base = make_llama(tmp_path / "b")
    a = AutoModelForCausalLM.from_pretrained(base).eval()
    b = AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / "c", seed=3)).eval()
    wins = torch.randint(2, 300, (3, 33), generator=torch.Generator().manual_seed(1))
    blocked = score(b, wins, ref=a)  # blocks of ROWS = 64 rows: here 1 per window; and of 5 rows:
    small = score(b, wins, ref=a, rows=5)
    whole = score(b, wins, ref=a, rows=10**6)
    assert blocked["kl_divergence"] > 0.01
    for got in (blocked, small):
        for k in ("perplexity", "kl_divergence", "top1_agreement"):
            assert got[k] == pytest.approx(whole[k], rel=1e-5), k
        torch.testing.assert_close(
            torch.tensor(got["kl_per_token"]), torch.tensor(whole["kl_per_token"]), atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_equal_torch_log_softmax_bit_for_bit(dtype):
    """The in-place log-softmax (two buffers instead of four) is ``x - torch.logsumexp(x)``
    exactly, infinite and NaN logits included, whatever the vocabulary size."""
    from eval.metrics import kl_per_token

    torch.manual_seed(0)
    for vocab in (7, 1000, 49152):
        x = (torch.randn(40, vocab) * 5).to(dtype)  # 40 rows: across the 16-row chunks
        x[3, :5] = -float("inf")
        x[4] = -float("inf")
        x[5, 2] = float("inf")
        x[6, 1] = float("nan")
        want = x.float() - torch.logsumexp(x.float(), dim=-1, keepdim=True)
        got = logprobs_from_logits(x.clone())
        assert torch.equal(got.nan_to_num(1.0, 2.0, 3.0), want.nan_to_num(1.0, 2.0, 3.0)), vocab
    # KL of the in-place terms: p * (r - q), 0 where p == 0, +inf where q is -inf and p > 0, NaN kept
    r = torch.log_softmax(torch.randn(8, 50), -1)
    q = torch.log_softmax(torch.randn(8, 50), -1)
    r[1, :3], q[2, 4], r[3, 0] = -float("inf"), -float("inf"), float("nan")
    p = r.double().exp()
    want = torch.where(p == 0, torch.zeros_like(p), p * (r.double() - q.double())).sum(-1).clamp_min(0)
    got = kl_per_token(r, q, rows=3)
    assert torch.equal(got.nan_to_num(-1.0, 9.0), want.nan_to_num(-1.0, 9.0))
    assert got[2] == float("inf") and got[3] != got[3]
