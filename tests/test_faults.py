"""Fault injection on the tiny model: runs killed (parent, stage process, both), stopped by SIGTERM
and SIGINT, run side by side, resumed; artefacts made stale by a changed adapter or config; the
inputs refused at the start. Each test asserts the exit code, the message and what the run
folder holds afterwards: nothing stale or half-written published, nothing the command cannot
rebuild deleted, no scratch, no lock.

A stage is paused at the worst moment, its output complete in its temporary folder just
before the rename that publishes it, by a ``sitecustomize`` hook the test puts on the stage
processes' ``PYTHONPATH`` (test-only; the pipeline has no fault switch of its own).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, make_adapter, run_stages, tiny_config

from pipeline import fingerprint
from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.records import read_record

HOOK = """
import os
if os.environ.get("QM_PAUSE_BEFORE_PUBLISH"):
    import contextlib, time
    from pathlib import Path
    import pipeline.common as common
    _real = common.publish_dir

    @contextlib.contextmanager
    def publish_dir(final):
        with _real(final) as tmp:
            yield tmp
            if Path(final).name == os.environ["QM_PAUSE_BEFORE_PUBLISH"]:
                Path(os.environ["QM_PAUSE_MARKER"]).write_text(str(os.getpid()))
                release = Path(os.environ["QM_PAUSE_RELEASE"])
                for _ in range(1200):
                    if release.exists():
                        break
                    time.sleep(0.1)

    common.publish_dir = publish_dir
"""

SHORT = {
    "requantize": {"enabled": False},
    "merge": {"compare_bases": False},
    "eval": {"tasks": [], "variants": ["reference", "merged"]},
}


def _config(tmp_path: Path, base, adapter, name: str = "c.yaml", **sections) -> Path:
    cfg = tiny_config(base, adapter, tmp_path / "runs", **{**SHORT, **sections})
    f = tmp_path / name
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return f


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


def _cli(cfg_file: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--config", str(cfg_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
    )


class Paused:
    """``run`` started in a session of its own, with the stage that publishes ``folder`` paused just
    before the rename; ``child`` is that stage process's PID once :meth:`wait` returns."""

    def __init__(self, tmp_path: Path, cfg_file: Path, folder: str, *args):
        hook = tmp_path / "hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(HOOK)
        self.marker, self.release, self.log = tmp_path / "paused", tmp_path / "release", tmp_path / "run.log"
        for f in (self.marker, self.release):
            f.unlink(missing_ok=True)
        env = _env(
            PYTHONPATH=f"{REPO}{os.pathsep}{hook}",
            QM_PAUSE_BEFORE_PUBLISH=folder,
            QM_PAUSE_MARKER=str(self.marker),
            QM_PAUSE_RELEASE=str(self.release),
        )
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", "--config", str(cfg_file), *args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait(self, timeout: float = 240) -> int:
        t0 = time.monotonic()
        while not self.marker.exists():
            assert self.proc.poll() is None, f"run ended before the pause:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() - t0 < timeout, "the stage never reached the pause"
            time.sleep(0.2)
        time.sleep(0.2)  # the marker's content is written
        self.child = int(self.marker.read_text())
        return self.child

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        self.release.touch()
        rc = self.proc.wait(timeout=timeout)
        return rc, self.log.read_text()


def _gone(pid: int, timeout: float = 60) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of ours counts as gone
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.1)
    return False


def _snapshot(root: Path) -> dict:
    """Every file and folder under ``root`` (hidden ones too) with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def _no_leftovers(root: Path) -> None:
    names = _names(root)
    assert "scratch" not in names and ".lock" not in names, names
    assert not [n for n in names if n.endswith((".partial", ".tmp"))], names


# --- a completed run, resumed --------------------------------------------------------------------


@pytest.fixture(scope="module")
def completed(tiny_base, tiny_adapter, tmp_path_factory) -> Path:
    """A run folder every stage has finished (built in this process: the records are the same)."""
    root = tmp_path_factory.mktemp("completed")
    cfg = load_config(_config(root, tiny_base, tiny_adapter))
    run_stages(cfg, upto="evaluate")
    assert read_record(cfg.layout, "evaluate")["outputs"]
    return cfg.run_dir


def _copy_completed(completed: Path, tmp_path: Path, tiny_base, tiny_adapter, **sections) -> tuple[Path, Path]:
    shutil.copytree(completed, tmp_path / "runs" / completed.name)  # sizes and times kept
    return _config(tmp_path, tiny_base, tiny_adapter, **sections), tmp_path / "runs" / completed.name


def test_rerun_skips_every_current_stage(completed, tiny_base, tiny_adapter, tmp_path):
    cfile, rd = _copy_completed(completed, tmp_path, tiny_base, tiny_adapter)
    before = _snapshot(rd)
    r = _cli(cfile, "run")
    assert r.returncode == 0, r.stderr[-3000:]
    for s in ("dequantize", "merge", "verify", "requantize", "evaluate"):
        assert f"stage {s}: current (its recorded inputs and outputs match), skipped" in r.stderr
    assert "nothing to do" in r.stderr and "=== stage" not in r.stderr
    assert _snapshot(rd) == before


def test_stages_on_a_completed_run(completed, tiny_base, tiny_adapter, tmp_path):
    cfile, rd = _copy_completed(completed, tmp_path, tiny_base, tiny_adapter)
    before = _snapshot(rd)
    r = _cli(cfile, "run", "--stages", "verify", "requantize", "evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage verify: current" in r.stderr and "nothing to do" in r.stderr
    assert _snapshot(rd) == before
    # verify must be redone, but the candidates it needs were published by the last verify:
    # refused before anything is deleted, naming what changed and what to add
    cfile = _config(tmp_path, tiny_base, tiny_adapter, "c2.yaml", verify={"max_kl": 0.5})
    r = _cli(cfile, "run", "--stages", "verify", "requantize", "evaluate")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "'verify' must run (config verify.max_kl: None -> 0.5)" in r.stderr
    assert "needs the output of 'merge'" in r.stderr and "Add 'merge' to --stages" in r.stderr
    assert "Traceback" not in r.stderr
    assert _snapshot(rd) == before


def test_kill_between_verify_renames_is_refused_before_deleting(completed, tiny_base, tiny_adapter, tmp_path):
    """A run killed after verify renamed its candidate to merged/ but before it wrote its record
    (the run had cleared verify's and later records first): merge's recorded output is gone and no
    finished verify accounts for it, so nothing can be built on it and nothing is deleted."""
    cfile, rd = _copy_completed(completed, tmp_path, tiny_base, tiny_adapter)
    for s in ("verify", "requantize", "evaluate"):
        (rd / "stages" / f"{s}.json").unlink()
    for f in ("report.json", "report.md", "report.png"):
        (rd / f).unlink()
    before = _snapshot(rd)
    r = _cli(cfile, "run", "--stages", "verify", "requantize", "evaluate")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "the 'merge' artefacts" in r.stderr and "are stale and 'verify' would build on them" in r.stderr
    assert "output merged-dequantized.unverified: no longer there" in r.stderr
    assert "Run from 'merge'" in r.stderr and "Traceback" not in r.stderr
    assert _snapshot(rd) == before


def test_changed_adapter_is_refused_then_redone(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", seed=1)
    cfile = _config(tmp_path, tiny_base, adapter)
    cfg = load_config(cfile)
    run_stages(cfg, upto="dequantize")
    rd, old = cfg.run_dir, read_record(cfg.layout, "dequantize")
    make_adapter(tiny_base, adapter, seed=2)  # retrained: same shapes, other weights
    before = _snapshot(rd)
    r = _cli(cfile, "run", "--stages", "merge", "verify")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "the 'dequantize' artefacts" in r.stderr and "are stale and 'merge' would build on them" in r.stderr
    assert "adapter.path: adapter_model.safetensors changed (size or modification time)" in r.stderr
    assert "Run from 'dequantize'" in r.stderr and "Traceback" not in r.stderr
    assert _snapshot(rd) == before  # nothing deleted
    r = _cli(cfile, "run", "--stages", "dequantize")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage dequantize: to run: adapter.path: " in r.stderr
    assert "adapter.path: adapter_model.safetensors changed" in r.stderr.split("=== stage")[0]
    rec = read_record(cfg.layout, "dequantize")
    assert rec["status"] == "ok" and rec["outputs"] != old["outputs"]  # rebuilt
    assert rec["inputs"]["files"]["adapter.path"] == fingerprint.path_fingerprint(adapter)
    assert _names(rd) == {"config.yaml", "versions.json", "plan.json", "stages", "dequantized"}


# --- killed and stopped runs ---------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["parent", "child", "group"])
def test_kill_9_then_resume(victim, tiny_base, tiny_adapter, tmp_path):
    cfile = _config(tmp_path, tiny_base, tiny_adapter)
    rd = load_config(cfile).run_dir
    run = Paused(tmp_path, cfile, "merged-dequantized.unverified", "--stages", "merge")
    child = run.wait()
    assert (rd / ".merged-dequantized.unverified.partial").is_dir()  # complete, not yet published
    if victim == "parent":
        os.kill(run.proc.pid, signal.SIGKILL)
        assert _gone(run.proc.pid)  # dead before the pause is released (the kernel has told the stage)
    elif victim == "child":
        os.kill(child, signal.SIGKILL)
    else:  # everything at once, before either can react
        for pid in (run.proc.pid, child):
            os.kill(pid, signal.SIGSTOP)
        for pid in (run.proc.pid, child):
            os.kill(pid, signal.SIGKILL)
    rc, out = run.finish()
    assert _gone(child), "the stage process outlived the run"
    names = _names(rd)
    assert "merged-dequantized.unverified" not in names  # never published
    rec = read_record(load_config(cfile).layout, "merge")
    if victim == "parent":
        assert rc == -signal.SIGKILL
        assert rec["status"] == "interrupted" and "SIGTERM" in rec["error"], (
            rec,
            out[-3000:],
        )  # the kernel told the stage
        assert ".lock" in names and not [n for n in names if n.endswith(".partial")], (rec, out[-3000:])
    elif victim == "child":
        assert rc == 4, out[-3000:]
        assert "stage merge was killed by SIGKILL (on Linux most often the out-of-memory killer)" in out
        assert "its peak resident memory was" in out and "this machine has" in out
        assert "runtime.offload: on" in out and "stages/merge.json" in out
        assert rec["status"] == "killed" and rec["peak_rss_bytes"] > 0
        _no_leftovers(rd)
    else:
        assert rc == -signal.SIGKILL and rec is None
        assert {".lock", "scratch", ".merged-dequantized.unverified.partial"} <= names
    r = _cli(cfile, "run", "--stages", "merge")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage merge: to run" in r.stderr
    if victim != "child":
        assert "no longer running); taken over" in r.stderr
    assert read_record(load_config(cfile).layout, "merge")["status"] == "ok"
    assert "merged-dequantized.unverified" in _names(rd)
    _no_leftovers(rd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_parent_alone_stops_the_stage_cleanly(sig, tiny_base, tiny_adapter, tmp_path):
    cfile = _config(tmp_path, tiny_base, tiny_adapter)
    rd = load_config(cfile).run_dir
    run = Paused(tmp_path, cfile, "dequantized", "--stages", "dequantize")
    child = run.wait()
    os.kill(run.proc.pid, sig)  # not the group: the parent must pass it on and wait
    rc, out = run.proc.wait(timeout=120), run.log.read_text()
    assert rc == 128 + sig, out[-3000:]
    assert _gone(child)
    name = signal.Signals(sig).name
    assert f"stopped by {name} during stage dequantize; its temporary files were removed" in out  # the stage
    assert f"{name}: stage dequantize stopped (exit code {128 + sig}) before it finished" in out  # the run
    assert "Stages finished in this run: none" in out
    assert read_record(load_config(cfile).layout, "dequantize")["status"] == "interrupted"
    assert _names(rd) == {"config.yaml", "versions.json", "plan.json", "stages"}


def test_two_runs_on_one_folder(tiny_base, tiny_adapter, tmp_path):
    cfile = _config(tmp_path, tiny_base, tiny_adapter)
    rd = load_config(cfile).run_dir
    first = Paused(tmp_path, cfile, "dequantized", "--stages", "dequantize")
    first.wait()
    before = _snapshot(rd)
    r = _cli(cfile, "run", "--stages", "dequantize")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"run folder '{rd}' is in use by another run (PID {first.proc.pid} on " in r.stderr
    assert _snapshot(rd) == before
    rc, out = first.finish()
    assert rc == 0, out[-3000:]
    assert read_record(load_config(cfile).layout, "dequantize")["status"] == "ok"
    assert "dequantized" in _names(rd)
    _no_leftovers(rd)


# --- disks that cannot be written ------------------------------------------------------------------


def test_full_disk_while_writing_the_run_config(tiny_base, tiny_adapter, tmp_path, monkeypatch, capsys):
    cfile = _config(tmp_path, tiny_base, tiny_adapter)
    rd = load_config(cfile).run_dir
    real = Path.write_text

    def full(self, *a, **k):
        if self.parent == rd:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    assert main(["run", "--config", str(cfile), "--stages", "dequantize"]) == 2
    err = capsys.readouterr().err
    assert f"writing '{rd / 'config.yaml'}' failed (No space left on device)" in err
    assert f"make '{rd}' writable" in err
    assert not rd.exists() or _names(rd) == set()


def test_read_only_run_folder(tiny_base, tiny_adapter, tmp_path, monkeypatch, capsys):
    cfile = _config(tmp_path, tiny_base, tiny_adapter)
    rd = load_config(cfile).run_dir
    rd.mkdir(parents=True)
    real = os.open

    def read_only(path, flags, *a, **k):
        if Path(path).parent == rd and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["run", "--config", str(cfile), "--stages", "dequantize"]) == 2
    assert f"run folder '{rd}' cannot be written (Read-only file system)" in capsys.readouterr().err
    assert _names(rd) == set()


# --- inputs refused at the start (issue 11, section 6) ---------------------------------------------


def _bad_base(tmp_path: Path, tiny_base: Path) -> Path:
    import json

    bad = tmp_path / "bad-base"
    shutil.copytree(tiny_base, bad)
    c = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**c, "hidden_size": 128}))
    return bad


def _adapter_without(tmp_path: Path, tiny_adapter: Path, **changes) -> Path:
    import json

    out = tmp_path / "odd-adapter"
    shutil.copytree(tiny_adapter, out)
    c = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**c, **changes}))
    return out


@pytest.mark.parametrize(
    "case,needles",
    [
        ("bootstrap", ["eval.bootstrap: Input should be greater than or equal to 1"]),
        (
            "config_sizes",
            [
                "base.path: config.json (hidden_size 128,",
                "disagrees with the weights",
                "'model.embed_tokens.weight' is [384, 64] in the weights, config.json implies [384, 128]",
            ],
        ),
        ("seq_len", ["eval.seq_len = 1024 is longer than the base's context length 512"]),
        ("stages", ["--stages: unknown stage(s) ['verfy']"]),
        ("target_modules", ["adapter_config.json has no target_modules"]),
        ("unknown_key", ["adapter_config.json sets ['lora_from_the_future']", "unknown to the installed PEFT"]),
        ("relative_path", ["base.path: './no/such/base' is not a local path (looked for '{tmp}/conf/no/such/base'"]),
    ],
)
def test_inputs_refused_at_the_start(case, needles, tiny_base, tiny_adapter, tmp_path, capsys):
    base, adapter, sections, args = tiny_base, tiny_adapter, {}, []
    if case == "config_sizes":
        base = _bad_base(tmp_path, tiny_base)
    elif case == "seq_len":
        sections = {"eval": {**SHORT["eval"], "seq_len": 1024}}
    elif case == "stages":
        args = ["--stages", "verfy"]
    elif case == "target_modules":
        adapter = _adapter_without(tmp_path, tiny_adapter, target_modules=None)
    elif case == "unknown_key":
        adapter = _adapter_without(tmp_path, tiny_adapter, lora_from_the_future=True)
    raw = tiny_config(base, adapter, tmp_path / "runs", **{**SHORT, **sections}).model_dump(mode="json")
    if case == "bootstrap":
        raw["eval"]["bootstrap"] = 0
    if case == "relative_path":
        raw["base"]["path"] = "./no/such/base"  # taken against the config file's folder
    cfile = tmp_path / "conf" / "c.yaml"
    cfile.parent.mkdir()
    cfile.write_text(yaml.safe_dump(raw))
    assert main(["run", "--config", str(cfile), *args]) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n.format(tmp=tmp_path) in err, err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written
