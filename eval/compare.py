"""Compare finished runs from their ``report.json`` files alone (nothing is recomputed).

    python -m eval.compare RUN_DIR [RUN_DIR ...] --out DIR

writes ``DIR/compare.md`` (one row per (run, variant): size in MiB = bytes / 2**20, then per
eval dataset perplexity, KL(reference || variant) in nats/token and top-1 agreement, then per
task accuracy), ``DIR/compare.json`` (``{"runs": [names], "rows": [...]}``) and
``DIR/compare.png`` (perplexity on the first dataset every row has, against size) and, for runs whose
reports hold a size/quality frontier (:mod:`eval.frontier`), ``DIR/frontier.png`` with the frontiers
overlaid, one colour per run, a frontier table in ``compare.md`` and ``frontiers`` in ``compare.json``. Datasets
and tasks are the union over runs; a missing value is blank in the table and absent in JSON.
Every file is written to a temporary name, then renamed.

Exit codes: 0 ok; 2 bad input (a RUN_DIR without ``report.json``, unreadable JSON, a report
without a ``variants`` mapping, a RUN_DIR given twice), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval import frontier
from eval.report import ORDER
from pipeline.common import write_json, write_text
from pipeline.errors import InputError

METRICS = (
    ("perplexity", "perplexity", "{:.4f}"),
    ("kl_divergence", "KL", "{:.4g}"),
    ("top1_agreement", "top-1", "{:.4f}"),
)


def load(run_dir: Path) -> dict:
    """The parsed ``run_dir/report.json``.

    Raises:
        InputError: missing, unreadable or not JSON, or no ``variants`` mapping of mappings.
    """
    f = run_dir / "report.json"
    if not f.is_file():
        raise InputError(f"{run_dir}: no report.json (has the run finished its report stage?)")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{f}: unreadable JSON ({e})") from None
    v = doc.get("variants") if isinstance(doc, dict) else None
    if not isinstance(v, dict) or not all(isinstance(r, dict) for r in v.values()):
        raise InputError(f"{f}: no 'variants' mapping of variant name to results")
    return doc


def rows(docs: dict[str, dict]) -> list[dict]:
    """One row per (run, variant) from ``{run name: report.json document}``, in run order then
    ``eval.report.ORDER``: ``{"run", "variant", "size_bytes", "size_mib", "perplexity",
    "kl_divergence", "top1_agreement", "accuracy"}`` (the last four dicts keyed by dataset/task)."""
    out = []
    for run, doc in docs.items():
        v = doc["variants"]
        for name in [n for n in ORDER if n in v] + [n for n in v if n not in ORDER]:
            r, size = v[name], v[name].get("size_bytes")
            out.append(
                {
                    "run": run,
                    "variant": name,
                    "size_bytes": size,
                    "size_mib": None if size is None else size / 2**20,
                    **{k: dict(r.get(k) or {}) for k, _, _ in METRICS},
                    "accuracy": dict(r.get("accuracy") or {}),
                }
            )
    return out


def _union(rs: list[dict], key: str) -> list[str]:
    return list(dict.fromkeys(k for r in rs for k in r[key]))


def markdown(names: list[str], paths: list[Path], docs: dict[str, dict], rs: list[dict]) -> str:
    """The comparison table (Markdown)."""
    datasets, tasks = _union(rs, "perplexity"), sorted(_union(rs, "accuracy"))
    lines = ["# Run comparison", "", "| run | folder | merge verification |", "|---|---|---|"]
    for n, p in zip(names, paths):
        passed = (docs[n].get("verification") or {}).get("passed")
        lines.append(f"| {n} | {p} | {'' if passed is None else ('passed' if passed else 'FAILED')} |")
    head = (
        ["run", "variant", "size (MiB)"]
        + [f"{d} {lab}" for d in datasets for _, lab, _ in METRICS]
        + [f"{t} acc" for t in tasks]
    )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rs:
        cells = [r["run"], r["variant"], "" if r["size_mib"] is None else f"{r['size_mib']:.1f}"]
        for d in datasets:
            cells += ["" if r[k].get(d) is None else fmt.format(r[k][d]) for k, _, fmt in METRICS]
        for t in tasks:
            a = r["accuracy"].get(t) or {}
            acc, se = a.get("acc"), a.get("acc_stderr")
            cells.append("" if acc is None else f"{acc:.3f}" + ("" if se is None else f" ± {se:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Perplexity: exp(mean NLL) per dataset; KL: mean KL(reference || variant), nats/token; "
        "top-1: fraction of tokens whose argmax matches the reference's; accuracy ± standard error.",
        "",
    ]
    return "\n".join(lines)


def plot(names: list[str], rs: list[dict], path: Path) -> None:
    """PNG: perplexity on the first dataset common to all rows against size (MiB), one colour
    per run, each point labelled with its variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    common = [d for d in _union(rs, "perplexity") if all(r["perplexity"].get(d) is not None for r in rs)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if common:
        ds = common[0]
        for i, n in enumerate(names):
            pts = [r for r in rs if r["run"] == n and r["size_mib"] is not None]
            ax.scatter([r["size_mib"] for r in pts], [r["perplexity"][ds] for r in pts], s=50, color=f"C{i}", label=n)
            for r in pts:
                ax.annotate(
                    r["variant"],
                    (r["size_mib"], r["perplexity"][ds]),
                    textcoords="offset points",
                    xytext=(5, 3),
                    fontsize=8,
                )
        ax.set_ylabel(f"perplexity on {ds}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no eval dataset common to all runs", ha="center", transform=ax.transAxes)
    ax.set_xlabel("size (MiB)")
    ax.set_title("quality against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def _common_dataset(fronts: dict[str, dict]) -> str | None:
    sets = [f.get("datasets") or [] for f in fronts.values()]
    return next((d for d in sets[0] if all(d in s for s in sets)), None) if sets else None


def frontier_markdown(fronts: dict[str, dict]) -> str:
    """The runs' frontiers in one table on the first eval dataset they share (empty without frontiers)."""
    if not fronts:
        return ""
    ds = _common_dataset(fronts)
    lines = [
        "## Size/quality frontiers",
        "",
        f"Eval text: {ds or '(none common to all runs; each run on its first)'}; size on disk; KL(reference || "
        "variant) nats/token; 95% intervals; chosen: the run's published gptq/; pareto: on its run's front.",
        "",
        "| run | variant | what | size (MiB) | bits/param | KL [95% CI] | top-1 [95% CI] | perplexity ratio [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, fr in fronts.items():
        d = ds or (fr.get("datasets") or [None])[0]
        par = set((fr.get("pareto") or {}).get(d, []))
        for p in fr.get("points", []):
            m = (p.get("metrics") or {}).get(d)
            if m is None or p.get("data") != "eval":
                continue
            tags = [t for t, on in (("chosen", p.get("chosen")), ("pareto", p["variant"] in par)) if on]
            lines.append(
                f"| {run} | {p['variant']}{' (' + ', '.join(tags) + ')' if tags else ''} | {p['label']} | "
                f"{frontier._fmt(p.get('size_mib'), None, '{:.1f}')} | {frontier._fmt(p.get('bits_per_param'), None, '{:.2f}')} | "
                f"{frontier._fmt(m.get('kl'), m.get('kl_ci'))} | {frontier._fmt(m.get('top1'), m.get('top1_ci'), '{:.4f}')} | "
                f"{frontier._fmt(m.get('perplexity_ratio'), m.get('perplexity_ratio_ci'), '{:.4f}')} |"
            )
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders holding report.json")
    ap.add_argument("--out", required=True, type=Path, help="folder for compare.{md,json,png}")
    a = ap.parse_args(argv)  # no RUN_DIR: argparse prints usage and exits 2
    try:
        if len({p.resolve() for p in a.runs}) < len(a.runs):
            raise InputError("the same RUN_DIR is given twice")
        loaded = [load(p) for p in a.runs]
    except InputError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    names = [str(d.get("run_name") or p.name) for d, p in zip(loaded, a.runs)]
    if len(set(names)) < len(names):  # same run_name twice: tell them apart by folder
        names = [str(p) for p in a.runs]
    docs = dict(zip(names, loaded))
    rs = rows(docs)
    a.out.mkdir(parents=True, exist_ok=True)
    fronts = {n: d["frontier"] for n, d in docs.items() if isinstance(d.get("frontier"), dict)}
    write_json(a.out / "compare.json", {"runs": names, "rows": rs, "frontiers": fronts})
    write_text(a.out / "compare.md", markdown(names, a.runs, docs, rs) + frontier_markdown(fronts))
    plot(names, rs, a.out / "compare.png")
    if fronts:
        frontier.plot(fronts, a.out / "frontier.png", ds=_common_dataset(fronts))
    print(a.out / "compare.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
