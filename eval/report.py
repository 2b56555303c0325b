"""The quality-loss report: ``report.json`` (the contract for comparing runs), ``report.md``
(a table read at a glance) and ``report.png`` (quality against size; KL distribution).

``report.json`` keys: ``variants.<name>.{perplexity, kl_divergence, top1_agreement, kl_stats,
tokens}`` (dicts keyed by eval dataset name), ``variants.<name>.accuracy`` (keyed by task),
``variants.<name>.{size_bytes, path}``; ``verification.{passed, kl_divergence, ...}``;
``stages.<stage>.{seconds, peak_rss_bytes, ...}``; ``protocol``; ``config``; ``versions``;
``adapter_training`` (when the adapter folder has a ``train_record.json``).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.common import write_json

ORDER = ["reference", "merged", "merged-dequantized", "merged-original", "gptq", "base"]
LABELS = {"reference": "reference (4-bit base + adapter, unmerged)", "merged": "merged (published)",
          "merged-dequantized": "merged onto dequantized weights", "merged-original": "merged onto original weights",
          "gptq": "GPTQ (reloaded)", "base": "base without adapter"}


def _stages(run_dir: Path) -> dict:
    from pipeline.run import STAGES
    files = {f.stem: f for f in (run_dir / "stages").glob("*.json")}
    return {s: json.loads(files[s].read_text()) for s in sorted(files, key=lambda s: (STAGES + [s]).index(s))}


def build(cfg, results: dict) -> dict:
    """The ``report.json`` document from per-variant ``results`` and the run folder's records."""
    from pipeline.run import versions
    rd = cfg.run_dir
    stages = _stages(rd)
    ver = stages.get("verify", {})
    variants = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_") and kk != "per_item"}
                for k, v in results.items()}
    train_rec = Path(cfg.adapter.paths[0]) / "train_record.json"
    doc = {
        "run_name": cfg.output.run_name,
        "variants": variants,
        "verification": {k: ver.get(k) for k in ("passed", "kl_divergence", "kl_max", "top1_agreement", "max_kl",
                                                  "problems", "merge_base", "merge_base_reason", "candidates")},
        "stages": stages,
        "protocol": {"perplexity": f"non-overlapping windows of {cfg.eval.seq_len} tokens (stride {cfg.eval.seq_len}), "
                                   f"{cfg.eval.seq_len - 1} predicted tokens counted per window, exp(mean NLL)",
                     "kl_divergence": "mean over predicted tokens of KL(P_reference || P_variant), nats/token",
                     "top1_agreement": "fraction of predicted tokens whose argmax equals the reference's",
                     "compute": "on CPU every variant but the 4-bit reference runs in float32 (weights upcast exactly)",
                     "size_bytes": "files on disk; reference: 4-bit base in memory + adapter file"},
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
    }
    if train_rec.is_file():
        doc["adapter_training"] = json.loads(train_rec.read_text())
    return doc


def _fmt_size(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def markdown(doc: dict) -> str:
    """A Markdown summary of a ``report.json`` document."""
    v = doc["variants"]
    names = [n for n in ORDER if n in v] + [n for n in v if n not in ORDER]
    datasets = list(next(iter(v.values()))["perplexity"]) if v else []
    tasks = sorted({t for r in v.values() for t in r.get("accuracy", {})})
    lines = [f"# Quality-loss report: {doc['run_name']}", ""]
    ver = doc["verification"]
    if ver.get("passed") is not None:
        lines += [f"Merge verification: **{'passed' if ver['passed'] else 'FAILED'}** "
                  f"(KL(reference || merged) {ver['kl_divergence']:.3g} nats/token, bound {ver['max_kl']:g}).", ""]
    if ver.get("merge_base"):
        lines += [f"Merge base: **{ver['merge_base']}** ({ver['merge_base_reason']}).", ""]
        cands = ver.get("candidates") or {}
        if cands:
            lines += ["| merge base | exact (KL to its unmerged model) | KL to reference | perplexity (verify text) | passed |",
                      "|---|---|---|---|---|"]
            lines += [f"| {b} | {c['exact_kl']:.3g} | {c['kl_divergence']:.4g} | {c['perplexity']:.4f} | {c['passed']} |"
                      for b, c in cands.items()] + [""]
    ref = v.get("reference", {})
    for ds in datasets:
        head = "| variant | size | perplexity | Δ vs reference | KL (nats/token) | KL p99 | top-1 agreement |"
        for t in tasks:
            head += f" {t} acc |"
        lines += [f"## {ds}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for n in names:
            r = v[n]
            ppl, rp = r["perplexity"].get(ds), ref.get("perplexity", {}).get(ds)
            delta = f"{100 * (ppl / rp - 1):+.2f}%" if ppl and rp else ""
            p99 = r.get("kl_stats", {}).get(ds, {}).get("kl_p99")
            row = (f"| {LABELS.get(n, n)} | {_fmt_size(r['size_bytes'])} | {ppl:.3f} | {delta} | "
                   f"{r['kl_divergence'].get(ds, 0):.4g} | {'' if p99 is None else f'{p99:.4g}'} | "
                   f"{r['top1_agreement'].get(ds, 1):.4f} |")
            for t in tasks:
                a = r.get("accuracy", {}).get(t)
                row += f" {a['acc']:.3f} ± {a['acc_stderr']:.3f} |" if a else " |"
            lines.append(row)
        lines.append("")
    lines += ["## Protocol", ""] + [f"- {k}: {val}" for k, val in doc["protocol"].items()] + [""]
    if "adapter_training" in doc:
        t = doc["adapter_training"]
        lines += ["## Adapter training (demo)", "",
                  f"Held-out loss {t['heldout_loss_before']:.3f} → {t['heldout_loss_after']:.3f} "
                  f"after {t['steps']} steps ({t['train_tokens']} tokens, {t['train_seconds']} s).", ""]
    lines += ["## Stages", "", "| stage | status | seconds | peak RSS |", "|---|---|---|---|"]
    for s, r in doc["stages"].items():
        lines.append(f"| {s} | {r.get('status')} | {r.get('seconds', 0):.1f} | {_fmt_size(r.get('peak_rss_bytes', 0))} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in doc["versions"].items() if val), ""]
    return "\n".join(lines)


def plot(doc: dict, results: dict, path: Path) -> None:
    """PNG: perplexity against size per variant (left), KL distribution per variant (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    v = doc["variants"]
    ds = next(iter(next(iter(v.values()))["perplexity"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    color = {n: f"C{i}" for i, n in enumerate(v)}  # one colour per variant in both panels
    for n, r in v.items():
        a.scatter(r["size_bytes"] / 2**20, r["perplexity"][ds], s=60, color=color[n])
        a.annotate(n, (r["size_bytes"] / 2**20, r["perplexity"][ds]), textcoords="offset points", xytext=(6, 4))
    a.set_xlabel("size (MiB)")
    a.set_ylabel(f"perplexity on {ds}")
    a.set_title("quality against size")
    a.grid(alpha=0.3)
    for n, r in results.items():
        k = r.get("_kl_samples", {}).get(ds)
        if k is not None and len(k):
            b.hist(np.log10(np.maximum(k, 1e-12)), bins=60, histtype="step", label=n, linewidth=1.5, color=color[n])
    b.set_xlabel("log10 KL(reference || variant) per token (nats; < 1e-12 shown at -12)")
    b.set_ylabel("tokens")
    b.set_title(f"KL distribution on {ds}")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(cfg, results: dict) -> Path:
    """Write ``report.json``, ``report.md`` and ``report.png`` into the run folder; returns the JSON path."""
    rd = cfg.run_dir
    doc = build(cfg, results)
    write_json(rd / "report.json", doc)
    (rd / "report.md").write_text(markdown(doc))
    plot(doc, results, rd / "report.png")
    return rd / "report.json"
