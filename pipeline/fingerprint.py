"""Fingerprints of what a stage read and wrote, so that no run builds on, or reports, stale artefacts.

A stage's **inputs** (``stages/<stage>.json`` key ``inputs``) are the config sections it
depends on (:data:`SECTIONS`, cumulative along the pipeline) and the files it reads: the
base's and the adapters' folders and, from verify on, the local text files. A model file is
fingerprinted by ``[size in bytes, modification time in ns]``; weights are never read. A text
file (verify, calibration and eval texts, up to 1 GB) by ``["sha256", digest]`` of its content:
a data set copied, re-downloaded or re-provisioned with the same content does not make GPTQ
run again (:func:`content_fingerprint`). Hidden files and Markdown files are left out (a README
edit changes nothing).

A stage's **outputs** (key ``outputs``) are fingerprinted the same way, by name in the run
folder, so that a later run can tell that they are still the ones the record describes.
A folder's fingerprint does not depend on the folder's own name (verify renames merge's
candidates; the files keep their sizes and times).
"""

from __future__ import annotations

import os
from pathlib import Path

# Config keys each stage depends on: a change in any of them makes the stage's artefacts stale.
_CHAIN = (
    ("dequantize", ("base", "adapter", "dequantize", "runtime.shard_size_gb")),
    ("merge", ("merge",)),
    ("verify", ("verify",)),
    ("requantize", ("requantize",)),
    ("evaluate", ("eval",)),
)
SECTIONS: dict[str, tuple[str, ...]] = {
    name: tuple(k for _, keys in _CHAIN[: i + 1] for k in keys) for i, (name, _) in enumerate(_CHAIN)
}


def _skipped(name: str) -> bool:
    """Hidden files (temporary files among them) and Markdown (READMEs, evaluate's model card)."""
    return name.startswith(".") or name.endswith(".md")


def path_fingerprint(path: str | os.PathLike):
    """``[size, mtime_ns]`` of a file; ``{relative path: [size, mtime_ns]}`` of a folder's files
    (hidden and Markdown files left out, symbolic links followed); None when absent."""
    p = Path(path)
    try:
        if p.is_file():
            st = p.stat()
            return [st.st_size, st.st_mtime_ns]
        if not p.is_dir():
            return None
        out = {}
        for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not _skipped(f):
                    st = os.stat(os.path.join(dirpath, f))
                    out[os.path.relpath(os.path.join(dirpath, f), p)] = [st.st_size, st.st_mtime_ns]
        return out
    except FileNotFoundError:  # removed while we looked
        return None


CONTENT_HASH_MAX_BYTES = 1 << 30  # text files up to this size are fingerprinted by content


def content_fingerprint(path: str | os.PathLike):
    """``["sha256", hex digest]`` of a file's bytes (files up to :data:`CONTENT_HASH_MAX_BYTES`;
    larger ones, and folders, as :func:`path_fingerprint`); None when absent."""
    import hashlib

    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size > CONTENT_HASH_MAX_BYTES:
            return path_fingerprint(p)
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return ["sha256", h.hexdigest()]
    except FileNotFoundError:
        return None


def _config_value(dump: dict, key: str):
    """The value at dotted ``key`` of a config dump (None when absent)."""
    v = dump
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def _input_paths(cfg, stage: str) -> dict[str, str]:
    """Config key -> local path of every file or folder ``stage`` reads (hub ids are left to the
    config); the keys of text files end in ``.data.path`` / ``.calibration...path`` /
    ``eval.datasets[i].path`` (:func:`_is_text_key`)."""
    i = [n for n, _ in _CHAIN].index(stage)
    paths = {"base.path": cfg.base.path}
    if cfg.adapter.path:
        paths["adapter.path"] = cfg.adapter.path
    for j, a in enumerate(cfg.adapter.combine.adapters if cfg.adapter.combine else []):
        paths[f"adapter.combine.adapters[{j}].path"] = a.path
    texts = []
    if i >= 2:
        texts.append(("verify.data", cfg.verify.data))
    if i >= 3:  # every GPTQ setting's calibration set, each part of a mix
        from pipeline.gptq import settings_to_check
        from pipeline.textdata import calibration_parts

        for key, s in settings_to_check(cfg.requantize):
            mixed = bool(getattr(s.calibration, "mix", None))
            for j, (src, _) in enumerate(calibration_parts(s.calibration)):
                texts.append((f"{key}.calibration" + (f".mix[{j}]" if mixed else ""), src))
    if i >= 4:
        texts += [(f"eval.datasets[{j}]", d) for j, d in enumerate(cfg.eval.datasets)]
        if cfg.eval.task_dir:
            paths["eval.task_dir"] = cfg.eval.task_dir
    for key, src in texts:
        if src.source == "file" and src.path:
            paths[f"{key}.path"] = src.path
    return {k: v for k, v in paths.items() if Path(v).exists()}


def _is_text_key(key: str) -> bool:
    """Whether the input at config key ``key`` is a text file (verify, calibration, eval data)."""
    return key.startswith(("verify.data.", "eval.datasets[")) or ".calibration" in key


def inputs(cfg, stage: str) -> dict:
    """What ``stage`` depends on: ``{"config": {key: value}, "files": {config key: fingerprint}}``
    (text files by content, models by size and time)."""
    dump = cfg.model_dump(mode="json")
    return {
        "config": {k: _config_value(dump, k) for k in SECTIONS[stage]},
        "files": {
            k: (content_fingerprint(p) if _is_text_key(k) else path_fingerprint(p))
            for k, p in _input_paths(cfg, stage).items()
        },
    }


def outputs(layout, stage: str) -> dict:
    """``{name in the run folder: fingerprint}`` of what ``stage`` has written there."""
    return {p.name: path_fingerprint(p) for p in layout.outputs(stage)}


def _flat(v, key: str) -> dict:
    """``{dotted key: leaf value}`` of a nested dict."""
    if isinstance(v, dict) and v:
        return {k2: x for k, sub in v.items() for k2, x in _flat(sub, f"{key}.{k}" if key else k).items()}
    return {key: v}


def changes(key: str, recorded, current) -> list[str]:
    """What changed between two :func:`path_fingerprint` s of ``key`` (a config key or an output name)."""
    if recorded == current:
        return []
    if current is None:
        return [f"{key}: no longer there"]
    if not (isinstance(recorded, dict) and isinstance(current, dict)):
        what = "content" if isinstance(current, list) and current[:1] == ["sha256"] else "size or modification time"
        return [f"{key}: changed ({what})"]
    out = [f"{key}: {f} removed" for f in recorded if f not in current]
    out += [f"{key}: {f} added" for f in current if f not in recorded]
    out += [
        f"{key}: {f} changed (size or modification time)"
        for f in recorded
        if f in current and recorded[f] != current[f]
    ]
    return out


def differences(recorded: dict, current: dict) -> list[str]:
    """What changed between recorded and current :func:`inputs`, one line each, e.g.
    ``config merge.base: 'dequantized' -> 'original'`` or
    ``adapter.path: adapter_model.safetensors changed (size or modification time)``."""
    out = []
    rc, cc = _flat(recorded.get("config", {}), ""), _flat(current.get("config", {}), "")
    for k in list(rc) + [k for k in cc if k not in rc]:
        if rc.get(k, "<absent>") != cc.get(k, "<absent>"):
            out.append(f"config {k}: {rc.get(k, '<absent>')!r} -> {cc.get(k, '<absent>')!r}")
    rf, cf = recorded.get("files", {}), current.get("files", {})
    for k in list(rf) + [k for k in cf if k not in rf]:
        out += [f"{k}: added"] if k not in rf else changes(k, rf[k], cf.get(k))
    return out
