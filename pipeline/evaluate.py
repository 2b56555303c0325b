"""Stage 5, evaluate: every variant against the reference, then the report.

Variants (``eval.variants``):

* ``reference``: the 4-bit base with the adapter applied unmerged (the trained model);
* ``merged``: ``<run_dir>/merged`` (dequantized base + adapter, verified);
* ``gptq``: ``<run_dir>/gptq`` reloaded from disk with plain ``transformers``;
* ``base``: the dequantized base without the adapter (what the adapter changed, for scale);
* ``merged-<base>``: the other merge base, ``gptq-<tag>``: GPTQ at the ``alternatives`` settings;
* ``eval.baselines``: PEFT's 4-bit merge, bitsandbytes NF4 and round-to-nearest of the merged model.

Against the reference, each variant also gets a perplexity ratio with a paired-bootstrap
interval over windows and, per task, a paired exact McNemar test over the same items.

One model in memory at a time: the reference's log-probs are kept on disk
(:class:`eval.metrics.ReferenceStore`) and every other variant is scored against them.
"""
from __future__ import annotations

from pathlib import Path

from eval.metrics import ReferenceStore, score
from pipeline.common import compute_dtype_for, dir_size_bytes, log, pick_device, stage_record, text_windows
from pipeline.errors import InputError


def _load_variant(cfg, name: str, device: str):
    """(model, tokenizer, path, size_bytes) of one variant, ready for eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rd = cfg.run_dir
    if name == "reference":
        from pipeline.verify import reference_model
        from pipeline.merge import adapter_file, effective_adapter
        model = reference_model(cfg)
        adapter = effective_adapter(cfg)
        f = adapter_file(adapter)
        f = f if f.is_file() else f.with_name("adapter_model.bin")
        size = model.get_memory_footprint() - _lora_bytes(model) + f.stat().st_size
        return model, AutoTokenizer.from_pretrained(rd / "merged"), f"{cfg.base.path} (4-bit) + {adapter}", size
    if name.startswith("baseline:"):
        from eval import baselines
        model, path, size = baselines.load(cfg, name.split(":", 1)[1], device)
        return model, AutoTokenizer.from_pretrained(rd / "merged"), path, size
    path = rd / {"merged": "merged", "gptq": "gptq", "base": "dequantized"}.get(name, name)
    if not path.is_dir():
        return None
    dtype = compute_dtype_for(cfg.out_dtype, device) if not name.startswith("gptq") else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map={"": device}).eval()
    return model, AutoTokenizer.from_pretrained(path), str(path), dir_size_bytes(path)


def _lora_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def run(cfg) -> Path:
    """Stage entry: score every variant, write ``report.json``, ``report.md``, ``report.png``.

    Returns:
        Path of ``<run_dir>/report.json``.
    """
    from eval import accuracy, report, stats
    e = cfg.eval
    device = pick_device(cfg.dequantize.device)
    variants = ["reference"] + [v for v in e.variants if v != "reference"]
    if "merged" in variants:  # the other merge base, when the verify stage published it
        variants[variants.index("merged") + 1:variants.index("merged") + 1] = [
            f"merged-{b}" for b in ("dequantized", "original") if (cfg.run_dir / f"merged-{b}").is_dir()]
    if "gptq" in variants:  # GPTQ at other settings (requantize.alternatives)
        variants[variants.index("gptq") + 1:variants.index("gptq") + 1] = sorted(
            p.name for p in cfg.run_dir.glob("gptq-*") if p.is_dir())
    variants += [f"baseline:{b}" for b in e.baselines]
    if not (cfg.run_dir / "merged").is_dir():
        raise InputError(f"{cfg.run_dir / 'merged'} is missing: run the merge and verify stages first.")
    with stage_record(cfg.run_dir, "evaluate") as rec:
        results: dict = {}
        stores: dict = {}
        ref_nll: dict = {}
        wins: dict = {}
        try:
            for name in variants:
                loaded = _load_variant(cfg, name, device)
                if loaded is None:
                    log(f"evaluate: variant '{name}' has no artefact in {cfg.run_dir}; skipped")
                    continue
                model, tok, path, size = loaded
                log(f"evaluate: {name} ({path})")
                r = {"path": path, "size_bytes": size, "perplexity": {}, "kl_divergence": {}, "kl_stats": {},
                     "top1_agreement": {}, "tokens": {}, "accuracy": {}}
                for ds in e.datasets:
                    if ds.name not in wins:
                        wins[ds.name] = text_windows(tok, ds, e.seq_len, f"eval.datasets[{ds.name}]")
                    w = wins[ds.name]
                    if name == "reference":
                        vocab = model.get_output_embeddings().weight.shape[0]
                        stores[ds.name] = ReferenceStore(len(w), e.seq_len, vocab, folder=cfg.run_dir)
                        s = score(model, w, store=stores[ds.name], progress=f"{name} / {ds.name}")
                    else:
                        s = score(model, w, ref=stores[ds.name], progress=f"{name} / {ds.name}")
                    r["perplexity"][ds.name] = s["perplexity"]
                    r["tokens"][ds.name] = s["tokens"]
                    if name == "reference":
                        ref_nll[ds.name] = s["nll_per_window"]
                    else:
                        r.setdefault("perplexity_ratio", {})[ds.name] = stats.perplexity_ratio_ci(
                            ref_nll[ds.name], s["nll_per_window"], e.seq_len - 1, n_boot=e.bootstrap)
                    if "kl_divergence" in s:
                        r["kl_divergence"][ds.name] = s["kl_divergence"]
                        r["top1_agreement"][ds.name] = s["top1_agreement"]
                        r["kl_stats"][ds.name] = {k: s[k] for k in ("kl_median", "kl_p99", "kl_max")}
                        r.setdefault("_kl_samples", {})[ds.name] = s["kl_per_token"]
                    else:
                        r["kl_divergence"][ds.name] = 0.0
                        r["top1_agreement"][ds.name] = 1.0
                if e.tasks:
                    r["accuracy"], r["per_item"] = accuracy.run_tasks(model, tok, e.tasks, e.task_dir, e.task_limit,
                                                                      e.batch_size)
                    if name != "reference":
                        r["accuracy_paired"] = {t: stats.paired_accuracy(results["reference"]["per_item"][t], items)
                                                for t, items in r["per_item"].items()}
                results[name.removeprefix("baseline:")] = r
                del model
        finally:
            for s in stores.values():
                s.close()
        rec.update(artefact=str(cfg.run_dir / "report.json"), variants=list(results),
                   datasets=[d.name for d in e.datasets], tasks=e.tasks)
    return report.write(cfg, results)  # after the stage record is written, so the report holds it
