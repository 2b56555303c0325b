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

Each variant is scored in lockstep with the reference, window by window
(:func:`eval.metrics.score`): memory holds the reference, one variant and one window's
distributions, whatever the vocabulary and the number of tokens, and nothing is stored on
disk. With ``runtime.offload`` (or under ``auto`` when the models do not fit), both run one
decoder layer at a time (:mod:`pipeline.layerwise`); lm-eval tasks and the in-memory
baselines need whole models and are then skipped, and the report says why.
"""

from __future__ import annotations

from pathlib import Path

from eval import accuracy, baselines, report, stats
from eval.metrics import ReferenceCache, score
from pipeline import fingerprint
from pipeline.checkpoint import AdapterFiles, Checkpoint
from pipeline.common import dir_size_bytes, log, release_freed_memory
from pipeline.errors import InputError
from pipeline.layout import MERGE_BASES
from pipeline.models import (
    apply_runtime,
    checkpoint_source,
    gptq_source,
    layerwise_wanted,
    load_tokenizer,
    lora_bytes,
    reference_source,
    scoring_dtype,
)
from pipeline.records import record_outputs, stage_record
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


def _load_variant(cfg, name: str, device: str, layerwise: bool):
    """(model, path description, size_bytes) of one variant, or None when it has no artefact."""
    layout = cfg.layout
    if name == "reference":
        adapter = AdapterFiles(cfg.effective_adapter, cfg.adapter.allow_pickle)
        model = reference_source(cfg, adapter.folder, device, layerwise)
        size = model.get_memory_footprint() - lora_bytes(model) if not layerwise else _4bit_bytes(cfg)
        return model, f"{cfg.base.path} (4-bit) + {adapter.folder}", size + adapter.file.stat().st_size
    if name.startswith("baseline:"):
        return baselines.load(cfg, name.split(":", 1)[1], device)
    path = {"merged": layout.merged, "gptq": layout.gptq, "base": layout.dequantized}.get(name, layout.root / name)
    if not path.is_dir():
        return None
    if name.startswith("gptq"):
        return gptq_source(path, cfg, device, layerwise), str(path), dir_size_bytes(path)
    model = checkpoint_source(path, cfg, device, scoring_dtype(cfg.out_dtype, device), layerwise)
    return model, str(path), dir_size_bytes(path)


def _4bit_bytes(cfg) -> int:
    """Memory of the 4-bit base as training held it: 0.5 byte per quantized weight plus a block
    absmax (4 bytes per 64), the rest in the compute dtype (an estimate from the headers)."""
    from pipeline.bnb4 import BaseTensors

    tensors = BaseTensors(Checkpoint(cfg.base.path), cfg, source="dequantized")
    shapes = tensors.ckpt.shapes()
    size = tensors.load_dtype.itemsize
    return int(
        sum(
            (0.5 + 4 / 64) * _numel(shapes[p.key])
            if p.action in ("quantize", "prequantized")
            else size * _numel(shapes[p.key])
            for p in tensors.plans
            if p.key in shapes
        )
    )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _score_datasets(cfg, name, model, ref, wins) -> dict:
    """Perplexity, and against the reference (lockstep) KL and top-1, of one variant on every eval dataset."""
    e = cfg.eval
    r = {"perplexity": {}, "kl_divergence": {}, "kl_stats": {}, "top1_agreement": {}, "tokens": {}, "speed": {}}
    for ds in e.datasets:
        w = wins[ds.name]
        if name == "reference":
            s = score(ref[ds.name], w, progress=f"{name} / {ds.name}")
            r["kl_divergence"][ds.name], r["top1_agreement"][ds.name] = 0.0, 1.0
            r["_nll"] = {**r.get("_nll", {}), ds.name: s["nll_per_window"]}
        else:
            s = score(model, w, ref=ref[ds.name], progress=f"{name} / {ds.name}")
            r.setdefault("perplexity_ratio", {})[ds.name] = stats.perplexity_ratio_ci(
                s["ref_nll_per_window"], s["nll_per_window"], e.seq_len - 1, n_boot=e.bootstrap
            )
            r["kl_divergence"][ds.name] = s["kl_divergence"]
            r["top1_agreement"][ds.name] = s["top1_agreement"]
            per_window = s["kl_per_token"].reshape(len(w), -1)
            boot = max(e.bootstrap, 1)
            r.setdefault("kl_ci", {})[ds.name] = stats.window_mean_ci(per_window.sum(1), per_window.shape[1], boot)
            r.setdefault("top1_ci", {})[ds.name] = stats.window_mean_ci(s["top1_per_window"], per_window.shape[1], boot)
            r["kl_stats"][ds.name] = {k: s[k] for k in ("kl_median", "kl_p99", "kl_max")}
            r.setdefault("_kl_samples", {})[ds.name] = s["kl_per_token"]
        r["perplexity"][ds.name] = s["perplexity"]
        r["tokens"][ds.name] = s["tokens"]
        r["speed"][ds.name] = {
            "seconds": s["seconds"],
            "tokens_per_second": s["tokens_per_second"],
            "with_reference": name != "reference",
        }
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
    with stage_record(layout, "evaluate", fingerprint.inputs(cfg, "evaluate"), outputs_later=True) as rec:
        device = apply_runtime(cfg.runtime)
        tok = load_tokenizer(layout.merged, cfg)
        e = cfg.eval
        layerwise = layerwise_wanted(cfg, sum(t.numel for t in Checkpoint(cfg.base.path).tensors.values()))
        wins = {
            ds.name: text_windows(tok, ds, e.seq_len, f"eval.datasets[{ds.name}]", role="eval") for ds in e.datasets
        }
        results: dict = {}
        skipped: dict = {}
        ref: dict = {}
        for name in variant_names(cfg):
            if layerwise and name.startswith("baseline:"):
                skipped[name] = "in-memory baselines need the whole model, which does not fit (runtime.offload)"
                continue
            loaded = _load_variant(cfg, name, device, layerwise)
            if loaded is None:
                log(f"evaluate: variant '{name}' has no artefact in {layout.root}; skipped")
                continue
            (model, path, size), loaded = loaded, None  # one reference to the model, so `del model` frees it
            log(f"evaluate: {name} ({path})")
            if name == "reference":  # its log-probs are kept in memory when they fit, else recomputed in lockstep
                ref = {ds.name: ReferenceCache(model) for ds in e.datasets}
            r = {"path": path, "size_bytes": size, **_score_datasets(cfg, name, model, ref, wins)}
            wanted = (
                name == "reference" or "all" in e.task_variants or name.removeprefix("baseline:") in e.task_variants
            )
            if not e.tasks or not wanted:
                r["accuracy"] = {}
            elif layerwise or not hasattr(model, "forward"):
                r["accuracy"] = {}
                skipped[f"{name}: lm-eval"] = "lm-eval runs whole models; this one runs one layer at a time"
            else:
                r.update(_score_tasks(cfg, name, model, tok, results))
            results[name.removeprefix("baseline:")] = r
            if name == "reference" and all(c.complete for c in ref.values()):
                for c in ref.values():
                    c.model = None  # every window is cached: the reference model itself is no longer needed
            del model
            release_freed_memory()
        rec.update(
            artefact=str(layout.report_json),
            variants=list(results),
            datasets=[d.name for d in e.datasets],
            tasks=e.tasks,
            layerwise=layerwise,
            skipped=skipped,
        )
    out = report.write(cfg, results)  # after the stage record is written, so the report holds it
    record_outputs(layout, "evaluate")
    return out
