"""Resume: which stages of a run are still current, which must be redone, and which artefacts a run
refuses to build on.

A stage is **current** when its record (``stages/<stage>.json``) says it finished (``ok`` or
``skipped``), the config sections and input files it recorded (:mod:`pipeline.fingerprint`)
are those of the current config, and every output it recorded is still there unchanged, or
was moved on, unchanged, by a later stage that finished (verify publishes merge's candidates
by renaming them; its record lists them under ``consumed``).

A run of the requested stages skips the leading current ones and redoes the first stale one
and every requested stage after it (:func:`plan_run`). It refuses, before anything is
deleted, to build on a stale earlier artefact, to redo a stage whose input an earlier run
already moved on, and to delete a later stage's outputs that it would not rebuild.
"""

from __future__ import annotations

from pipeline import fingerprint
from pipeline.errors import InputError
from pipeline.layout import STAGE_NAMES, stage
from pipeline.records import read_records


def _consumed(records: dict, name: str, out: str, fp) -> bool:
    """Whether a later stage that finished moved output ``out`` of stage ``name`` on, unchanged."""
    later = STAGE_NAMES[STAGE_NAMES.index(name) + 1 :]
    return any(
        records.get(s, {}).get("status") == "ok" and records[s].get("consumed", {}).get(out) == fp for s in later
    )


def stale_reasons(cfg, name: str, records: dict) -> list[str]:
    """Why stage ``name`` is not current (empty when it is), each reason naming what changed."""
    rec = records.get(name)
    if rec is None:
        return ["it has no record here (never run, or stopped before it finished)"]
    if rec.get("status") not in ("ok", "skipped"):
        return [f"its last run did not finish ({rec.get('status')}: {rec.get('error', 'no error recorded')})"]
    if "inputs" not in rec or "outputs" not in rec:
        return ["its record holds no fingerprints of its inputs and outputs (an older version, or interrupted)"]
    reasons = fingerprint.differences(rec["inputs"], fingerprint.inputs(cfg, name))
    root = cfg.layout.root
    for out, fp in rec["outputs"].items():
        now = fingerprint.path_fingerprint(root / out)
        if now != fp and not (now is None and _consumed(records, name, out, fp)):
            reasons += [f"output {line}" for line in fingerprint.changes(out, fp, now)]
    reasons += [
        f"output {p.name}: not written by its recorded run"
        for p in cfg.layout.outputs(name)
        if p.name not in rec["outputs"]
    ]
    return reasons


def left_artefacts(cfg, name: str, records: dict) -> bool:
    """Whether stage ``name`` left anything a later stage could build on: outputs in the run folder,
    or a record of a finished run (whose outputs a later stage may have moved on)."""
    return bool(cfg.layout.outputs(name)) or (records.get(name) or {}).get("status") in ("ok", "skipped")


def _in_place(cfg, name: str, records: dict) -> bool:
    """Whether stage ``name`` is current with every output it recorded at its own path."""
    outs = (records.get(name) or {}).get("outputs") or {}
    root = cfg.layout.root
    return not stale_reasons(cfg, name, records) and all(
        fingerprint.path_fingerprint(root / o) == fp for o, fp in outs.items()
    )


def check_upstream(cfg, first: str, records: dict | None = None) -> None:
    """Refuse to run ``first`` on top of a stale earlier artefact: every earlier stage must be
    current, or have left nothing to build on.

    Raises:
        InputError: naming the stale stage, what changed, and the stages to run.
    """
    records = read_records(cfg.layout) if records is None else records
    for s in STAGE_NAMES[: STAGE_NAMES.index(first)]:
        reasons = stale_reasons(cfg, s, records)
        if reasons and left_artefacts(cfg, s, records):
            raise InputError(
                f"the '{s}' artefacts in {cfg.layout.root} are stale and '{first}' would build on them:\n  "
                + "\n  ".join(reasons[:8])
                + f"\nRun from '{s}': --stages {' '.join(STAGE_NAMES[STAGE_NAMES.index(s) :])} (or all stages)."
            )


def plan_run(cfg, requested: list[str]) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Split ``requested`` (valid, in pipeline order) into the stages to skip and the stages to run.

    The leading current stages are skipped; the first stale one and every requested stage after
    it are run. When the first stale stage needs an output that an earlier, requested stage
    left moved on (verify's input after verify published it), the run starts at that earlier stage.

    Returns:
        ``(skip, run, reasons)``: ``reasons[stage]`` says why a stage to run is stale.
    Raises:
        InputError: before anything is deleted, when the run would build on a stale earlier stage
            that was not requested, needs an output no requested stage rebuilds, or would delete
            a later stage's outputs that it does not rebuild.
    """
    layout = cfg.layout
    records = read_records(layout)
    reasons = {s: stale_reasons(cfg, s, records) for s in requested}
    start = next((s for s in requested if reasons[s]), None)
    if start is None:
        return list(requested), [], {}
    check_upstream(cfg, start, records)
    while missing := [n for n in stage(start).needs if not _in_place(cfg, n, records)]:
        need, outs = missing[0], ", ".join(stage(missing[0]).outputs)
        if need not in requested:
            raise InputError(
                f"'{start}' must run ({'; '.join(reasons[start][:3])}), and it needs the output of '{need}' "
                f"({outs}) in {layout.root}, which is not there (never made, or moved on by an earlier "
                f"'{start}'). Add '{need}' to --stages, or run all stages."
            )
        reasons[need] = [f"'{start}' must run and needs its output ({outs}) again"]
        start = need
    later = [s for s in STAGE_NAMES[STAGE_NAMES.index(start) + 1 :] if s not in requested and layout.outputs(s)]
    if later:
        raise InputError(
            f"'{start}' must run ({'; '.join(reasons[start][:3])}), which makes the outputs of "
            f"{', '.join(repr(s) for s in later)} in {layout.root} stale, but they are not in --stages: "
            "add them (or run all stages), or remove those outputs yourself."
        )
    i = requested.index(start)
    return list(requested[:i]), list(requested[i:]), {s: reasons.get(s, []) for s in requested[i:]}
