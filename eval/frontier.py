"""The size/quality frontier: every way of storing the fine-tune the run measured (GPTQ settings:
the main one, the alternatives, the quality budget's tries, a per-module allocation; round-to-
nearest; bitsandbytes NF4 of the merged model; PEFT's 4-bit merge; the 16-bit merged model and the
reference for scale) as one point each: size on disk (MiB and bits per parameter) against KL to
the reference, top-1 agreement and perplexity ratio, with 95% intervals.

``report.json`` key ``frontier``::

    {"params": int, "datasets": [names], "chosen": variant,
     "points": [{"variant", "label", "kind", "size_bytes", "size_mib", "bits_per_param",
                 "bits_per_weight" (quantized weights; GPTQ/RTN), "fp16_modules" (GPTQ),
                 "setting" (GPTQ: tag), "chosen", "data": "eval" | "verify",
                 "metrics": {dataset: {"kl", "kl_ci", "top1", "top1_ci", "perplexity_ratio",
                                       "perplexity_ratio_ci"}}}],
     "pareto": {dataset: [variant, ...]}}

``kind``: ``reference``, ``float``, ``gptq``, ``gptq-mixed``, ``rtn``, ``bnb_nf4``,
``peft_4bit_merge``. Budget tries that were rejected (their checkpoints are not kept unless
``budget.keep_tries``) appear with ``data: "verify"`` and their numbers on the verify text; they
are listed in the table but not drawn on the eval-text axes. Intervals are ``[low, high]`` or
``None`` (one window).
"""

from __future__ import annotations

from pathlib import Path

KINDS = {"rtn": "rtn", "bnb_nf4": "bnb_nf4", "peft_4bit_merge": "peft_4bit_merge", "reference": "reference"}


def _ci(d: dict | None) -> list | None:
    if not d or d.get("ci_low") is None:
        return None
    return [d["ci_low"], d["ci_high"]]


def _gptq_builds(rq: dict) -> dict[str, dict]:
    """Folder name -> GPTQ build record (main ``gptq``, ``gptq-<tag>`` alternatives, budget tries)."""
    out = {}
    for b in [rq] + list(rq.get("alternatives") or []) + list((rq.get("budget") or {}).get("tried") or []):
        if b.get("artefact"):
            out[Path(b["artefact"]).name] = b
    return out


def _rtn_bits(doc: dict) -> float | None:
    """Bits per weight of the round-to-nearest baseline: the main GPTQ setting's layout."""
    rq = (doc.get("config") or {}).get("requantize") or {}
    if "bits" not in rq:
        return None
    g = rq.get("group_size", -1)
    return rq["bits"] + ((16 + rq["bits"]) / g if g and g > 0 else 0.0)


def _label(kind: str, b: dict | None, name: str) -> str:
    if kind in ("gptq", "gptq-mixed") and b:
        extra = []
        if b.get("desc_act"):
            extra.append("act-order")
        elif b.get("act_group_aware"):
            extra.append("GAR")
        if b.get("sym") is False:
            extra.append("asym")
        if b.get("mse"):
            extra.append(f"mse {b['mse']:g}")
        if b.get("gptaq_alpha"):
            extra.append(f"GPTAQ {b['gptaq_alpha']:g}")
        if b.get("fp16_modules"):
            extra.append(f"{len(b['fp16_modules'])} modules 16-bit")
        return f"GPTQ {b.get('bits')}-bit g{b.get('group_size')}" + (f" ({', '.join(extra)})" if extra else "")
    return {
        "reference": "reference: 4-bit NF4 base + adapter",
        "float": "merged, 16-bit",
        "rtn": "round-to-nearest",
        "bnb_nf4": "bitsandbytes NF4 of the merged model",
        "peft_4bit_merge": "PEFT 4-bit merge_and_unload",
    }.get(kind, name)


def build(doc: dict, params: int) -> dict:
    """The ``frontier`` document from a ``report.json`` document's variants and requantize record."""
    v = doc["variants"]
    rq = (doc.get("stages") or {}).get("requantize") or {}
    builds = _gptq_builds(rq)
    datasets = list(next(iter(v.values()))["perplexity"]) if v else []
    chosen = "gptq" if "gptq" in v else None
    points = []
    for name, r in v.items():
        if name == "merged":
            kind = "float"
        elif name.startswith("gptq"):
            b = builds.get(name, {})
            kind = "gptq-mixed" if b.get("fp16_modules") else "gptq"
        elif name in KINDS:
            kind = KINDS[name]
        else:
            continue  # the base without adapter, the other merge base: not ways of storing the fine-tune
        b = builds.get(name) if kind.startswith("gptq") else None
        size = r.get("size_bytes")
        p = {
            "variant": name,
            "label": _label(kind, b, name),
            "kind": kind,
            "size_bytes": size,
            "size_mib": None if size is None else size / 2**20,
            "bits_per_param": None if not (size and params) else 8 * size / params,
            "bits_per_weight": (b or {}).get("bits_per_weight") or (_rtn_bits(doc) if kind == "rtn" else None),
            "fp16_modules": len((b or {}).get("fp16_modules") or []) if b else None,
            "setting": (b or {}).get("tag"),
            "chosen": name == chosen,
            "data": "eval",
            "metrics": {},
        }
        for ds in datasets:
            pr = (r.get("perplexity_ratio") or {}).get(ds)
            p["metrics"][ds] = {
                "kl": (r.get("kl_divergence") or {}).get(ds),
                "kl_ci": _ci((r.get("kl_ci") or {}).get(ds)),
                "top1": (r.get("top1_agreement") or {}).get(ds),
                "top1_ci": _ci((r.get("top1_ci") or {}).get(ds)),
                "perplexity_ratio": 1.0 if name == "reference" else (pr or {}).get("ratio"),
                "perplexity_ratio_ci": _ci(pr),
            }
        points.append(p)
    budget = rq.get("budget") or {}
    for t in budget.get("tried") or []:
        if t.get("artefact") and Path(t["artefact"]).name in v:
            continue  # kept and evaluated: already a point
        ds = budget.get("data", "verify")
        points.append(
            {
                "variant": f"budget:{t['tag']}",
                "label": _label("gptq-mixed" if t.get("fp16_modules") else "gptq", t, t["tag"]) + " (budget try)",
                "kind": "gptq-mixed" if t.get("fp16_modules") else "gptq",
                "size_bytes": t.get("size_bytes"),
                "size_mib": None if t.get("size_bytes") is None else t["size_bytes"] / 2**20,
                "bits_per_param": None if not (t.get("size_bytes") and params) else 8 * t["size_bytes"] / params,
                "bits_per_weight": t.get("bits_per_weight"),
                "fp16_modules": len(t.get("fp16_modules") or []),
                "setting": t.get("tag"),
                "chosen": False,
                "data": "verify",
                "metrics": {
                    ds: {
                        "kl": t.get("kl_divergence"),
                        "kl_ci": None,
                        "top1": t.get("top1_agreement"),
                        "top1_ci": None,
                        "perplexity_ratio": 1 + t["perplexity_increase"] if "perplexity_increase" in t else None,
                        "perplexity_ratio_ci": None,
                    }
                },
            }
        )
    points.sort(key=lambda p: (p["size_bytes"] is None, p["size_bytes"] or 0))
    return {
        "params": params,
        "datasets": datasets,
        "chosen": chosen,
        "points": points,
        "pareto": {ds: pareto(points, ds) for ds in datasets},
    }


def pareto(points: list[dict], ds: str) -> list[str]:
    """Variants no other point beats on both size and KL on ``ds`` (eval-text points with both),
    smallest first."""
    pts = sorted(
        (
            p
            for p in points
            if p["data"] == "eval" and p["size_bytes"] and p["metrics"].get(ds, {}).get("kl") is not None
        ),
        key=lambda p: (p["size_bytes"], p["metrics"][ds]["kl"]),
    )
    out, best = [], float("inf")
    for p in pts:
        if p["metrics"][ds]["kl"] < best:
            out.append(p["variant"])
            best = p["metrics"][ds]["kl"]
    return out


def _fmt(x, ci, f="{:.4g}") -> str:
    if x is None:
        return ""
    s = f.format(x)
    return s + (f" [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else "")


def markdown(fr: dict) -> list[str]:
    """The frontier as Markdown lines: one table per eval dataset, smallest first."""
    lines = [
        "## Size/quality frontier",
        "",
        f"One point per way of storing the fine-tune; size on disk, bits per parameter = 8 x bytes / "
        f"{fr['params']:,} parameters; KL(reference || variant) nats/token, top-1 agreement and perplexity "
        "ratio to the reference with 95% bootstrap intervals over windows. **Chosen**: the published `gptq/`; "
        "*pareto*: no other point is both smaller and closer (KL). Budget tries marked (verify text) were "
        "measured on the verify text only.",
        "",
    ]
    for ds in fr["datasets"]:
        par = set(fr["pareto"].get(ds, []))
        lines += [
            f"### {ds}",
            "",
            "| variant | what | size (MiB) | bits/param | bits/weight | KL [95% CI] | top-1 [95% CI] | perplexity ratio [95% CI] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in fr["points"]:
            m = p["metrics"].get(ds)
            if m is None and p["data"] == "eval":
                continue
            if m is None:  # a budget try: its verify-text numbers
                m = next(iter(p["metrics"].values()))
            name = f"**{p['variant']}** (chosen)" if p["chosen"] else p["variant"]
            if p["variant"] in par:
                name += " *pareto*"
            if p["data"] == "verify":
                name += " (verify text)"
            lines.append(
                f"| {name} | {p['label']} | {_fmt(p['size_mib'], None, '{:.1f}')} | "
                f"{_fmt(p['bits_per_param'], None, '{:.2f}')} | {_fmt(p['bits_per_weight'], None, '{:.3g}')} | "
                f"{_fmt(m['kl'], m['kl_ci'])} | {_fmt(m['top1'], m['top1_ci'], '{:.4f}')} | "
                f"{_fmt(m['perplexity_ratio'], m['perplexity_ratio_ci'], '{:.4f}')} |"
            )
        lines.append("")
    return lines


def plot(frontiers: dict[str, dict], path: Path, ds: str | None = None) -> None:
    """PNG: KL to the reference (log scale) and perplexity ratio against size (MiB), one colour per
    run in ``frontiers`` ({run name: frontier}), one marker per kind, intervals as error bars, the
    chosen checkpoint starred, each run's Pareto points joined. One row of two panels per
    evaluation dataset (only ``ds`` where given; a run without it shows its first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marker = {
        "reference": "D",
        "float": "s",
        "gptq": "o",
        "gptq-mixed": "P",
        "rtn": "v",
        "bnb_nf4": "^",
        "peft_4bit_merge": "X",
    }
    if ds:
        rows = [ds]
    else:  # one row per evaluation dataset, in the order the runs list them
        rows = list(dict.fromkeys(d for fr in frontiers.values() for d in fr["datasets"])) or [None]
    fig, axs = plt.subplots(len(rows), 2, figsize=(13, 5 * len(rows)), squeeze=False)
    for (a, b), row in zip(axs, rows):
        _plot_row(a, b, frontiers, row, marker)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def _plot_row(a, b, frontiers: dict[str, dict], ds: str | None, marker: dict) -> None:
    """One dataset's KL (axis ``a``) and perplexity ratio (axis ``b``) against size, every run."""
    for i, (run, fr) in enumerate(frontiers.items()):
        d = ds if ds in fr["datasets"] else (fr["datasets"] or [None])[0]
        if d is None:
            continue
        color = f"C{i}"
        pts = [p for p in fr["points"] if p["data"] == "eval" and p["size_mib"] and p["metrics"].get(d)]
        for p in pts:
            m = p["metrics"][d]
            for ax, key, floor in ((a, "kl", 1e-7), (b, "perplexity_ratio", None)):
                y = m.get(key)
                if y is None:
                    continue
                y = max(y, floor) if floor else y
                ci = m.get(f"{key}_ci")
                err = None if not ci else [[max(y - max(ci[0], floor or ci[0]), 0)], [max(ci[1] - y, 0)]]
                ax.errorbar(
                    p["size_mib"], y, yerr=err, fmt=marker.get(p["kind"], "o"), color=color, ms=7, capsize=3, alpha=0.9
                )
                if p["chosen"]:
                    ax.scatter(p["size_mib"], y, marker="*", s=320, facecolors="none", edgecolors="k", zorder=5)
                ax.annotate(
                    p["variant"] if len(frontiers) == 1 else f"{run}: {p['variant']}",
                    (p["size_mib"], y),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize=7,
                )
        par = [p for p in pts if p["variant"] in fr["pareto"].get(d, [])]
        a.plot(
            [p["size_mib"] for p in par],
            [max(p["metrics"][d]["kl"], 1e-7) for p in par],
            "-",
            color=color,
            alpha=0.5,
            label=f"{run} ({d})",
        )
    a.set_yscale("log")
    a.set_xlabel("size on disk (MiB)")
    a.set_ylabel("KL(reference || variant), nats/token")
    a.set_title(f"{ds}: KL against size (star: chosen; line: Pareto front)")
    b.axhline(1.0, color="grey", lw=0.8)
    b.set_xlabel("size on disk (MiB)")
    b.set_ylabel("perplexity / reference perplexity")
    b.set_title(f"{ds}: perplexity ratio against size")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
