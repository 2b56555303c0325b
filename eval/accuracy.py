"""Task accuracy through lm-eval (``lm_eval.simple_evaluate``) on an in-memory model.

Tasks are lm-eval task YAMLs in ``eval/tasks`` (or ``eval.task_dir``); their local
``data_files`` are taken relative to the YAML's folder, so runs work from any directory
and offline. Returns accuracy with its standard error and the per-item correctness
(``log_samples=True``) for paired comparisons between variants.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from pipeline.errors import InputError

TASK_DIR = Path(__file__).resolve().parent / "tasks"


def task_config(name: str, task_dir: str | None = None) -> dict:
    """The task's YAML as a dict, with relative ``data_files`` made absolute.

    Raises:
        InputError: no ``<name>.yaml`` in the task folder, or a local data file it names is missing.
    """
    folder = Path(task_dir) if task_dir else TASK_DIR
    f = folder / f"{name}.yaml"
    if not f.is_file():
        raise InputError(f"eval task '{name}': no {f}. Available: {sorted(p.stem for p in folder.glob('*.yaml'))}")
    cfg = yaml.safe_load(f.read_text())
    files = cfg.get("dataset_kwargs", {}).get("data_files", {})
    for split, p in files.items():
        if isinstance(p, str) and not Path(p).is_absolute() and "://" not in p:
            files[split] = str((folder / p).resolve())
            if not Path(files[split]).is_file():
                raise InputError(f"eval task '{name}': data file '{files[split]}' named by {f} is missing.")
    return cfg


def _quiet() -> None:
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import lm_eval.evaluator as ev

    ev.get_git_commit_hash = lambda: None  # spawns `git describe`; metadata only
    ev.add_env_info = lambda storage: None


def run_tasks(
    model, tokenizer, tasks: list[str], task_dir: str | None = None, limit: int | None = None, batch_size: int = 8
) -> tuple[dict, dict]:
    """Accuracy of ``model`` on each task, one ``simple_evaluate`` per task (so each task's time is
    its own), requests batched ``batch_size`` at a time.

    Returns:
        (``{task: {"acc", "acc_stderr", "n", "seconds", "forward_seconds"}}``: seconds in all, and
        those inside the model's forward calls, ``{task: [0/1 per item, in file order]}``).
    """
    import time

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _quiet()
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    acc, items = {}, {}
    clock = _ForwardClock(model)
    for cfg in (task_config(t, task_dir) for t in tasks):
        t0 = time.perf_counter()
        clock.seconds = 0.0
        out = simple_evaluate(
            model=lm,
            tasks=[cfg],
            task_manager=TaskManager(include_defaults=False),
            limit=limit,
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
        t = cfg["task"]
        r = out["results"][t]
        samples = sorted(out["samples"][t], key=lambda s: s["doc_id"])
        acc[t] = {
            "acc": r["acc,none"],
            "acc_stderr": r["acc_stderr,none"],
            "n": len(samples),
            "seconds": round(time.perf_counter() - t0, 1),
            "forward_seconds": round(clock.seconds, 3),
        }
        items[t] = [int(s["acc"]) for s in samples]
    clock.remove()
    return acc, items


class _ForwardClock:
    """Wall seconds spent inside ``model``'s forward calls (hooks on the top module), so a task's
    time can be split into model forwards and lm-eval's own request handling."""

    def __init__(self, model):
        import time

        self.seconds, self._t0, self._now = 0.0, None, time.perf_counter
        self._hooks = [
            model.register_forward_pre_hook(self._start),
            model.register_forward_hook(self._stop),
        ]

    def _start(self, *_):
        self._t0 = self._now()

    def _stop(self, *_):
        if self._t0 is not None:
            self.seconds += self._now() - self._t0
            self._t0 = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
