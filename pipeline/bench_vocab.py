"""Benchmark: evaluation memory on a large vocabulary (issue 12), ``make bench-vocab``.

A synthetic checkpoint with the shape of a small Gemma (Gemma-3 270M: hidden 640, 18 layers,
4 heads / 1 KV head of 256, intermediate 2048, a tied 262144-token vocabulary; random bf16
weights) and an all-linear r=16 adapter go through dequantize, merge, verify (1024 tokens) and
evaluate (4096 tokens; reference, merged). Each stage's peak RSS is compared with the model's
size; the reference log-probs are stored nowhere (scored in lockstep; kept in memory only when
they fit in 1 GB), so the store costs 0 bytes per logit.

Usage: ``python -m pipeline.bench_vocab [--out runs/bench-vocab] [--keep]``. Timings belong
here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

VOCAB = 262144
BEFORE = {"evaluate_peak_rss_gib": 13.1, "verify_peak_rss_gib": 8.8, "store_bytes_per_logit": 4}  # issue 12


def build(folder: Path, tokenizer_from: Path) -> tuple[Path, Path]:
    """The synthetic base and its adapter, cached under ``folder``; the tokenizer (any with fewer
    tokens than the vocabulary: the logits are 262144 wide whatever the text) from ``tokenizer_from``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    base, adapter = folder / "base", folder / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return base, adapter
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(model.float(), LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    pm.save_pretrained(adapter)
    return base, adapter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-vocab")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and the run folder")
    ap.add_argument("--tokenizer", default="build/demo/smollm2-135m", help="a tokenizer folder (make demo builds it)")
    a = ap.parse_args(argv)
    from pipeline.common import quiet_libraries, write_json, write_text
    from pipeline.config import Config
    from pipeline.run import run_all

    quiet_libraries()
    out = Path(a.out).resolve()
    base, adapter = build(out / "inputs", Path(a.tokenizer))
    cfg = Config.model_validate(
        {
            "base": {"path": str(base)},
            "adapter": {"path": str(adapter)},
            "output": {"dir": str(out), "run_name": "run"},
            "runtime": {"device": "cpu", "offload": "off"},
            "dequantize": {"compute_dtype": "bfloat16", "dtype": "bfloat16", "save": False},
            "merge": {"compare_bases": False},
            "verify": {"seq_len": 512, "data": {"name": "pydoc-heldout", "max_tokens": 1024}},
            "requantize": {"enabled": False},
            "eval": {
                "seq_len": 512,
                "datasets": [{"name": "pydoc-heldout", "max_tokens": 4096}],
                "tasks": [],
                "variants": ["reference", "merged"],
            },
        }
    )
    rc = run_all(cfg)
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((out / "run" / "stages").glob("*.json"))}
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    rows = {
        s: {
            "seconds": r.get("seconds"),
            "peak_rss_gib": round(r.get("peak_rss_bytes", 0) / 2**30, 2),
            "status": r.get("status"),
        }
        for s, r in stages.items()
    }
    ev = rows.get("evaluate", {})
    ev_peak = stages.get("evaluate", {}).get("peak_rss_bytes")
    largest = 2 * model_bytes  # the merged model scored in float32 on CPU, the largest model evaluate loads
    bound = largest + 1.5e9  # issue 12: within the largest loaded model plus 1.5 GB
    doc = {
        "vocab": VOCAB,
        "model_bytes": model_bytes,
        "stages": rows,
        "before": BEFORE,
        "store_bytes_per_logit": 0,
        "target_evaluate_peak_rss_gib": 2.5,
        "evaluate_target_met": bool(ev.get("peak_rss_gib") is not None and ev["peak_rss_gib"] <= 2.5),
        "evaluate_peak_rss_bytes": ev_peak,
        "largest_loaded_model_bytes": largest,
        "evaluate_bound_bytes": int(bound),
        "evaluate_within_bound": bool(ev_peak is not None and ev_peak <= bound),
    }
    write_json(out / "bench.json", doc)
    md = [
        f"Synthetic Gemma-3-270M shape, vocabulary {VOCAB}, bf16 checkpoint {model_bytes / 2**30:.2f} GiB; "
        "verify 1024 tokens, evaluate 4096 tokens (reference and merged).",
        "",
        "| stage | seconds | peak RSS (GiB) | before (issue 12) |",
        "|---|---|---|---|",
    ]
    for s, r in rows.items():
        before = BEFORE.get(f"{s}_peak_rss_gib", "")
        md.append(f"| {s} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | {before} |")
    md += [
        "",
        f"Reference log-probs stored: 0 bytes per logit (before: {BEFORE['store_bytes_per_logit']}, a float32 "
        "memmap of tokens x vocabulary). Evaluate peak RSS target 2.5 GiB: "
        f"{'met' if doc['evaluate_target_met'] else 'not met'}. Within the largest loaded model (the merged "
        f"model in float32, {largest / 1e9:.2f} GB) plus 1.5 GB = {bound / 1e9:.2f} GB: "
        f"{'yes' if doc['evaluate_within_bound'] else 'no'} ({(ev_peak or 0) / 1e9:.2f} GB).",
    ]
    write_text(out / "bench.md", "\n".join(md) + "\n")
    print("\n".join(md))
    if not a.keep:
        shutil.rmtree(out / "inputs", ignore_errors=True)
        shutil.rmtree(out / "run", ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
