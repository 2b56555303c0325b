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

from eval import frontier
from pipeline.common import check_not_orphaned, write_error, write_json, write_text
from pipeline.layout import versions
from pipeline.records import read_records

ORDER = ["reference", "merged", "merged-dequantized", "merged-original", "gptq", "base"]
LABELS = {
    "reference": "reference (4-bit base + adapter, unmerged)",
    "merged": "merged (published)",
    "merged-dequantized": "merged onto dequantized weights",
    "merged-original": "merged onto original weights",
    "gptq": "GPTQ (reloaded)",
    "base": "base without adapter",
    "peft_4bit_merge": "PEFT 4-bit merge_and_unload",
    "bnb_nf4": "merged, bitsandbytes NF4",
    "rtn": "merged, round-to-nearest",
}


def build(cfg, results: dict) -> dict:
    """The ``report.json`` document from per-variant ``results`` and the run folder's records."""
    stages = read_records(cfg.layout)
    ver = stages.get("verify", {})
    variants = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in results.items()}
    train_rec = Path(cfg.adapter.paths[0]) / "train_record.json"
    doc = {
        "run_name": cfg.output.run_name,
        "variants": variants,
        "verification": {
            k: ver.get(k)
            for k in (
                "passed",
                "kl_divergence",
                "kl_max",
                "top1_agreement",
                "max_kl",
                "problems",
                "merge_base",
                "merge_base_reason",
                "candidates",
            )
        },
        "stages": stages,
        "protocol": {
            "perplexity": f"non-overlapping windows of {cfg.eval.seq_len} tokens (stride {cfg.eval.seq_len}), "
            f"{cfg.eval.seq_len - 1} predicted tokens counted per window, exp(mean NLL)",
            "kl_divergence": "mean over predicted tokens of KL(P_reference || P_variant), nats/token",
            "top1_agreement": "fraction of predicted tokens whose argmax equals the reference's",
            "compute": "on CPU every variant but the 4-bit reference runs in float32 (weights upcast exactly)",
            "size_bytes": "files on disk; reference and in-memory baselines: memory footprint (+ adapter file)",
            "perplexity_ratio": f"variant/reference perplexity; 95% interval by paired bootstrap over windows "
            f"({cfg.eval.bootstrap} resamples)",
            "accuracy_paired": "per task: accuracy difference to the reference over the same items, exact "
            "McNemar test (significant: p < 0.05)",
        },
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
    }
    if train_rec.is_file():
        doc["adapter_training"] = json.loads(train_rec.read_text())
    doc["module_bits"] = {
        name: module_bits(Path(r["path"])) for name, r in variants.items() if name.startswith("gptq") and r.get("path")
    }
    doc["frontier"] = frontier.build(doc, _params(cfg))
    return doc


def _params(cfg) -> int:
    """Parameters of the merged model (from its checkpoint's headers), 0 when it is absent."""
    from pipeline.checkpoint import Checkpoint

    if not cfg.layout.merged.is_dir():
        return 0
    return sum(t.numel for t in Checkpoint(cfg.layout.merged, what="merged checkpoint").tensors.values())


def module_bits(path: Path) -> dict:
    """``{"counts": {bits: modules}, "fp16": [module names kept 16-bit], "modules": {name: bits}}`` of a
    GPTQ checkpoint folder (empty when it is not one)."""
    from pipeline.allocate import module_bits as bits_of

    if not (path / "config.json").is_file():
        return {}
    m = bits_of(path)
    counts: dict = {}
    for b in m.values():
        counts[str(b)] = counts.get(str(b), 0) + 1
    return {"counts": counts, "fp16": [k for k, b in m.items() if b == 16], "modules": m}


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
        lines += [
            f"Merge verification: **{'passed' if ver['passed'] else 'FAILED'}** "
            f"(KL(reference || merged) {ver['kl_divergence']:.3g} nats/token, bound {ver['max_kl']:g}).",
            "",
        ]
    if ver.get("merge_base"):
        lines += [f"Merge base: **{ver['merge_base']}** ({ver['merge_base_reason']}).", ""]
        cands = ver.get("candidates") or {}
        if cands:
            lines += [
                "| merge base | exact (KL to its unmerged model) | KL to reference | perplexity (verify text) | passed |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {b} | {c['exact_kl']:.3g} | {c['kl_divergence']:.4g} | {c['perplexity']:.4f} | {c['passed']} |"
                for b, c in cands.items()
            ] + [""]
    for ds in datasets:
        head = (
            "| variant | size | perplexity | ratio to reference [95% CI] | KL mean | KL median | KL p99 | KL max "
            "| top-1 agreement |"
        )
        for t in tasks:
            head += f" {t} acc (Δ, McNemar p) |"
        lines += [f"## {ds}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for n in names:
            r = v[n]
            ppl = r["perplexity"].get(ds)
            pr = r.get("perplexity_ratio", {}).get(ds)
            ratio = ""
            if pr:
                ci = f" [{pr['ci_low']:.4f}, {pr['ci_high']:.4f}]" if pr.get("ci_low") is not None else ""
                ratio = f"{pr['ratio']:.4f}{ci}"
            ks = r.get("kl_stats", {}).get(ds, {})
            kl = lambda k: "" if ks.get(k) is None else f"{ks[k]:.4g}"  # noqa: E731
            row = (
                f"| {LABELS.get(n, n)} | {_fmt_size(r['size_bytes'])} | {ppl:.3f} | {ratio} | "
                f"{r['kl_divergence'].get(ds, 0):.4g} | {kl('kl_median')} | {kl('kl_p99')} | {kl('kl_max')} | "
                f"{r['top1_agreement'].get(ds, 1):.4f} |"
            )
            for t in tasks:
                a, pa = r.get("accuracy", {}).get(t), r.get("accuracy_paired", {}).get(t)
                cell = f" {a['acc']:.3f} ± {a['acc_stderr']:.3f}" if a else " "
                if pa:
                    cell += (
                        f" ({pa['delta']:+.3f}, p={pa['p_value']:.3g}{', significant' if pa['significant'] else ''})"
                    )
                row += cell + " |"
            lines.append(row)
        lines.append("")
    if doc.get("frontier", {}).get("points"):
        lines += frontier.markdown(doc["frontier"])
    mb = {k: x for k, x in (doc.get("module_bits") or {}).items() if x}
    if mb:
        lines += ["## Bits per module", "", "| checkpoint | modules by bits | kept 16-bit |", "|---|---|---|"]
        for k, x in mb.items():
            counts = ", ".join(f"{n} x {b}-bit" for b, n in sorted(x["counts"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {k} | {counts} | {', '.join(x['fp16']) or 'none'} |")
        lines += ["", "Every decoder linear module's bits: `report.json` → `module_bits.<checkpoint>.modules`.", ""]
    rq = doc["stages"].get("requantize", {})
    if rq.get("calibration_composition"):
        c = rq["calibration_composition"]
        lines += [
            "## Calibration",
            "",
            f"'{c['name']}': {c['tokens']} tokens in {c['windows']} windows of at most {c['seq_len']} tokens "
            f"(filled {100 * c['fill']:.1f}%), packed with whole records.",
            "",
            "| part | format | rendered with | weight | windows | tokens (share) | whole records | records cut |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['name']} | {p['format']} | {p['template'] or ''} | {p['weight']:.3g} | {p['windows']} | "
            f"{p['tokens']} ({100 * p['token_share']:.1f}%) | {p['records']} | {p['records_cut']} |"
            for p in c["parts"]
        ] + [""]
    if rq.get("budget"):
        b = rq["budget"]
        lim = ", ".join(
            x
            for x in (
                f"perplexity +{100 * b['max_perplexity_increase']:g}%" if b["max_perplexity_increase"] else "",
                f"KL ≤ {b['max_kl']:g}" if b["max_kl"] else "",
            )
            if x
        )
        lines += [
            "## Quality budget",
            "",
            f"Budget: {lim} against the reference on '{b['data']}'. Settings tried from "
            f"the smallest checkpoint up; kept: **{b['chosen'] or 'none'}**.",
            "",
            "| setting | bits/weight | perplexity | Δ vs reference | KL | top-1 | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {t['bits']}-bit g{t['group_size']}{' act-order' if t['desc_act'] else ''} | {t['bits_per_weight']} | "
            f"{t['perplexity']:.3f} | {t['perplexity_increase']:+.2%} | {t['kl_divergence']:.4g} | "
            f"{t['top1_agreement']:.4f} | {'kept' if t['within_budget'] else 'rejected'} |"
            for t in b["tried"]
        ] + [""]
    lines += _timing(doc)
    lines += ["## Protocol", ""] + [f"- {k}: {val}" for k, val in doc["protocol"].items()] + [""]
    if "adapter_training" in doc:
        t = doc["adapter_training"]
        lines += [
            "## Adapter training (demo)",
            "",
            f"Held-out loss {t['heldout_loss_before']:.3f} → {t['heldout_loss_after']:.3f} "
            f"after {t['steps']} steps ({t['train_tokens']} tokens, {t['train_seconds']} s).",
            "",
        ]
    lines += ["## Stages", "", "| stage | status | seconds | peak RSS |", "|---|---|---|---|"]
    for s, r in doc["stages"].items():
        lines.append(
            f"| {s} | {r.get('status')} | {r.get('seconds', 0):.1f} | {_fmt_size(r.get('peak_rss_bytes', 0))} |"
        )
    lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in doc["versions"].items() if val), ""]
    return "\n".join(lines)


def _timing(doc: dict) -> list[str]:
    """Where the evaluate stage's time went: per variant, the forward passes (tokens/s; every
    variant but the reference is scored in lockstep with it, so its rows include a reference
    forward) and each lm-eval task; what was skipped and why."""
    v = doc["variants"]
    tasks = sorted({t for r in v.values() for t in r.get("accuracy", {})})
    head = "| variant | forward seconds | tokens/s |" + "".join(f" {t} seconds (in forwards) |" for t in tasks)
    lines = ["## Evaluation time", "", head, "|" + "---|" * (head.count("|") - 1)]
    forwards = task_forwards = 0.0
    for name, r in v.items():
        sp = r.get("speed") or {}
        secs = sum(x["seconds"] for x in sp.values())
        toks = sum(r.get("tokens", {}).values())
        forwards += secs
        row = f"| {name} | {secs:.1f} | {toks / secs if secs else 0:.0f} |"
        for t in tasks:
            a = r.get("accuracy", {}).get(t, {})
            task_forwards += a.get("forward_seconds", 0.0)
            row += (
                f" {a.get('seconds', '')}" + (f" ({a['forward_seconds']:.1f})" if "forward_seconds" in a else "") + " |"
            )
        lines.append(row)
    ev = doc["stages"].get("evaluate", {})
    if ev.get("seconds"):
        total = forwards + task_forwards
        lines += [
            "",
            f"Forward passes {total:.1f} s of the stage's {ev['seconds']:.1f} s ({ev['seconds'] / max(total, 1e-9):.2f}x; "
            f"perplexity/KL {forwards:.1f} s, lm-eval {task_forwards:.1f} s; "
            f"{'one decoder layer at a time' if ev.get('layerwise') else 'whole models'}).",
        ]
    for what, why in (ev.get("skipped") or {}).items():
        lines.append(f"- skipped: {what}: {why}")
    return lines + [""]


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
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if err := write_error(path, e):
            raise err from None
        raise
    finally:
        plt.close(fig)


def model_card(doc: dict) -> str:
    """A short model-card section for the GPTQ checkpoint: what was merged, how it was quantized,
    what it lost against the trained (unmerged) model."""
    c, v = doc["config"], doc["variants"]
    g = v.get("gptq", {})
    rq = doc["stages"].get("requantize", {})
    ver = doc["verification"]
    adapters = c["adapter"]["path"] or ", ".join(
        f"{a['path']} x{a['weight']}" for a in c["adapter"]["combine"]["adapters"]
    )
    lines = [
        "# Model card: merged QLoRA fine-tune, GPTQ",
        "",
        f"- **Base model**: `{c['base']['path']}`; **adapter**: `{adapters}`.",
        f"- **Merge**: LoRA delta added to the {ver.get('merge_base', 'dequantized')} weights "
        f"({c['dequantize']['quant_type'].upper()}, double quantization {c['dequantize']['double_quant']}); "
        f"checked against the unmerged model: KL {ver['kl_divergence']:.3g} nats/token (bound {ver['max_kl']:g}).",
        f"- **Quantization**: GPTQ (GPTQModel) {rq.get('bits')}-bit, group size {rq.get('group_size')}, "
        f"act-order {rq.get('desc_act')}, group-aware reordering {rq.get('act_group_aware')}, symmetric "
        f"{rq.get('sym')}, damping {rq.get('damp_percent')}, MSE scale search {rq.get('mse') or 'off'}, GPTAQ "
        f"{rq.get('gptaq_alpha') or 'off'}; calibration set '{rq.get('calibration')}' "
        f"({rq.get('calibration_tokens')} tokens{_composition(rq)}).",
        f"- **Bits per module**: {_bits_line(doc.get('module_bits', {}).get('gptq') or {}, rq)}",
        "",
        "## What it lost",
        "",
        "Against the fine-tuned model as trained (4-bit base + adapter, unmerged):",
        "",
    ]
    for ds, ppl in g.get("perplexity", {}).items():
        pr = g.get("perplexity_ratio", {}).get(ds, {})
        ci = f" (95% CI {pr['ci_low']:.3f}-{pr['ci_high']:.3f})" if pr.get("ci_low") is not None else ""
        lines.append(
            f"- {ds}: perplexity {v['reference']['perplexity'][ds]:.3f} → {ppl:.3f}, ratio "
            f"{pr.get('ratio', float('nan')):.3f}{ci}; KL {g['kl_divergence'][ds]:.4g} nats/token; "
            f"top-1 agreement {g['top1_agreement'][ds]:.3f}."
        )
    for t, a in g.get("accuracy", {}).items():
        pa = g.get("accuracy_paired", {}).get(t, {})
        lines.append(
            f"- {t}: accuracy {v['reference']['accuracy'][t]['acc']:.3f} → {a['acc']:.3f}"
            + (f" (McNemar p = {pa['p_value']:.3g})" if pa else "")
            + "."
        )
    lines += ["", "Produced by qlora-merge; full report: `../report.md` (beside this checkpoint's folder).", ""]
    return "\n".join(lines)


def _composition(rq: dict) -> str:
    c = rq.get("calibration_composition") or {}
    parts = c.get("parts") or []
    if len(parts) < 2 and not any(p.get("template") for p in parts):
        return ""
    return ": " + ", ".join(
        f"{100 * p['token_share']:.0f}% {p['name']}" + (f" ({p['template']} template)" if p.get("template") else "")
        for p in parts
    )


def _bits_line(mb: dict, rq: dict) -> str:
    if not mb:
        return f"every decoder linear module {rq.get('bits')}-bit; embeddings, norms and the head 16-bit."
    counts = ", ".join(f"{n} at {b}-bit" for b, n in sorted(mb["counts"].items(), key=lambda kv: int(kv[0])))
    kept = f"; kept 16-bit (most loss per byte): {', '.join(f'`{m}`' for m in mb['fp16'])}" if mb["fp16"] else ""
    return (
        f"decoder linear modules: {counts}{kept}. Embeddings, norms and the head are 16-bit. It loads in plain "
        "`transformers` (`quantization_config.modules_in_block_to_quantize` lists the quantized modules); the "
        "full list is in the report (`module_bits.gptq`)."
    )


def write(cfg, results: dict) -> Path:
    """Write ``report.json``, ``report.md`` and ``report.png`` into the run folder; returns the JSON path.

    Raises:
        InputError: the run folder cannot be written (full or read-only disk).
        Interrupted: this is an orphaned stage process (its ``run`` parent died): nothing is written.
    """
    check_not_orphaned()
    layout = cfg.layout
    doc = build(cfg, results)
    write_json(layout.report_json, doc)
    write_text(layout.report_md, markdown(doc))
    if "gptq" in doc["variants"] and layout.gptq.is_dir():
        write_text(layout.gptq / "README.md", model_card(doc))
    plot(doc, results, layout.report_png)
    if doc["frontier"]["points"]:
        frontier.plot({doc["run_name"]: doc["frontier"]}, layout.frontier_png)
    return layout.report_json
