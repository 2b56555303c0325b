"""Stage 5, evaluate: every variant against the reference, then the report.

Variants (``eval.variants``):

* ``reference``: the 4-bit base with the adapter applied unmerged (the trained model);
* ``merged``: ``merged/`` (verified);
* ``gptq``: ``gptq/`` reloaded from disk with plain ``transformers``;
* ``base``: the dequantized base without the adapter (what the adapter changed, for scale);
* ``merged-<base>``: the other merge base, ``gptq-<tag>``: GPTQ at the ``alternatives`` settings;
* ``eval.baselines``: PEFT's 4-bit merge, bitsandbytes NF4 and round-to-nearest of the merged model.

Against the reference, each variant also gets a perplexity ratio with a paired-bootstrap
interval over windows and, per task, a paired exact McNemar test over the same items.

One model in memory at a time: the reference's log-probs are kept on disk
(:class:`eval.metrics.ReferenceStore`) and every other variant is scored against them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from eval import accuracy, baselines, report, stats
from eval.metrics import ReferenceStore, score
from pipeline.checkpoint import AdapterFiles
from pipeline.common import dir_size_bytes, log
from pipeline.errors import InputError
from pipeline.layout import MERGE_BASES
from pipeline.models import apply_runtime, load_causal_lm, load_tokenizer, lora_bytes, reference_model, scoring_dtype
from pipeline.records import stage_record
from pipeline.textdata import text_windows


def variant_names(cfg) -> list[str]:
    """The variants to score, in report order: the reference first, the other merge base after
    ``merged``, GPTQ alternatives after ``gptq``, baselines last."""
    layout, e = cfg.layout, cfg.eval
    names = ["reference"] + [v for v in e.variants if v != "reference"]
    if "merged" in names:
        i = names.index("merged") + 1
        names[i:i] = [f"merged-{b}" for b in MERGE_BASES if layout.merged_other(b).is_dir()]
    if "gptq" in names:
        i = names.index("gptq") + 1
        names[i:i] = [p.name for p in layout.gptq_alternatives()]
    return names + [f"baseline:{b}" for b in e.baselines]


def _load_variant(cfg, name: str, device: str):
    """(model, path description, size_bytes) of one variant, or None when it has no artefact."""
    layout = cfg.layout
    if name == "reference":
        adapter = AdapterFiles(cfg.effective_adapter, cfg.adapter.allow_pickle)
        model = reference_model(cfg, adapter.folder, device)
        size = model.get_memory_footprint() - lora_bytes(model) + adapter.file.stat().st_size
        return model, f"{cfg.base.path} (4-bit) + {adapter.folder}", size
    if name.startswith("baseline:"):
        return baselines.load(cfg, name.split(":", 1)[1], device)
    path = {"merged": layout.merged, "gptq": layout.gptq, "base": layout.dequantized}.get(name, layout.root / name)
    if not path.is_dir():
        return None
    dtype = None if name.startswith("gptq") else scoring_dtype(cfg.out_dtype, device)
    return load_causal_lm(path, cfg, device=device, dtype=dtype), str(path), dir_size_bytes(path)


def _score_datasets(cfg, name, model, tok, wins, stores, ref_nll) -> dict:
    """Perplexity, KL and top-1 of one variant on every eval dataset."""
    e = cfg.eval
    r = {"perplexity": {}, "kl_divergence": {}, "kl_stats": {}, "top1_agreement": {}, "tokens": {}}
    for ds in e.datasets:
        if ds.name not in wins:
            wins[ds.name] = text_windows(tok, ds, e.seq_len, f"eval.datasets[{ds.name}]", role="eval")
        w = wins[ds.name]
        if name == "reference":
            s = score(model, w, store=stores[ds.name], progress=f"{name} / {ds.name}")
            ref_nll[ds.name] = s["nll_per_window"]
            r["kl_divergence"][ds.name], r["top1_agreement"][ds.name] = 0.0, 1.0
        else:
            s = score(model, w, ref=stores[ds.name], progress=f"{name} / {ds.name}")
            r.setdefault("perplexity_ratio", {})[ds.name] = stats.perplexity_ratio_ci(
                ref_nll[ds.name], s["nll_per_window"], e.seq_len - 1, n_boot=e.bootstrap
            )
            r["kl_divergence"][ds.name] = s["kl_divergence"]
            r["top1_agreement"][ds.name] = s["top1_agreement"]
            r["kl_stats"][ds.name] = {k: s[k] for k in ("kl_median", "kl_p99", "kl_max")}
            r.setdefault("_kl_samples", {})[ds.name] = s["kl_per_token"]
        r["perplexity"][ds.name] = s["perplexity"]
        r["tokens"][ds.name] = s["tokens"]
    return r


def _score_tasks(cfg, name, model, tok, results) -> dict:
    """lm-eval accuracy of one variant, paired against the reference's items."""
    e = cfg.eval
    if not e.tasks:
        return {"accuracy": {}}
    acc, items = accuracy.run_tasks(model, tok, e.tasks, e.task_dir, e.task_limit, e.batch_size)
    r = {"accuracy": acc, "per_item": items}
    if name != "reference":
        r["accuracy_paired"] = {
            t: stats.paired_accuracy(results["reference"]["per_item"][t], its) for t, its in items.items()
        }
    return r


def run(cfg) -> Path:
    """Stage entry: score every variant, write ``report.json``, ``report.md``, ``report.png``.

    Returns:
        Path of ``report.json``.
    Raises:
        InputError: ``merged/`` missing (run the merge and verify stages first), an eval text
            shorter than one window, an unknown lm-eval task.
    """
    layout = cfg.layout
    if not layout.merged.is_dir():
        raise InputError(f"{layout.merged} is missing: run the merge and verify stages first.")
    with stage_record(layout, "evaluate") as rec:
        device = apply_runtime(cfg.runtime)
        tok = load_tokenizer(layout.merged, cfg)
        results: dict = {}
        wins: dict = {}
        ref_nll: dict = {}
        with contextlib.ExitStack() as stack:
            stores: dict = {}
            for name in variant_names(cfg):
                loaded = _load_variant(cfg, name, device)
                if loaded is None:
                    log(f"evaluate: variant '{name}' has no artefact in {layout.root}; skipped")
                    continue
                model, path, size = loaded
                log(f"evaluate: {name} ({path})")
                if name == "reference":
                    vocab = model.get_output_embeddings().weight.shape[0]
                    for ds in cfg.eval.datasets:
                        wins[ds.name] = text_windows(
                            tok, ds, cfg.eval.seq_len, f"eval.datasets[{ds.name}]", role="eval"
                        )
                        stores[ds.name] = stack.enter_context(
                            ReferenceStore(len(wins[ds.name]), cfg.eval.seq_len, vocab, folder=layout.scratch)
                        )
                r = {"path": path, "size_bytes": size, **_score_datasets(cfg, name, model, tok, wins, stores, ref_nll)}
                r.update(_score_tasks(cfg, name, model, tok, results))
                results[name.removeprefix("baseline:")] = r
                del model
        rec.update(
            artefact=str(layout.report_json),
            variants=list(results),
            datasets=[d.name for d in cfg.eval.datasets],
            tasks=cfg.eval.tasks,
        )
    return report.write(cfg, results)  # after the stage record is written, so the report holds it
