"""Stage processes and signals: how ``run`` starts each stage, stops it, and reports its death.

Parent side (``run``): each stage runs in a child process in a process group of its own
(:func:`run_child`), so that a terminal's Ctrl-C reaches the parent only and the parent
decides: it forwards SIGINT/SIGTERM/SIGHUP to the stage's group, gives the stage
:data:`GRACE_SECONDS` to clean up (remove its unfinished folder, write its record), then
kills the group. While the child runs, its peak resident memory (``VmHWM``) is sampled, so
that a child killed outright (the out-of-memory killer's SIGKILL) can be reported with it.

Child side (``stage``): :func:`become_stage_child` asks the kernel to send SIGTERM when the
parent dies (``prctl(PR_SET_PDEATHSIG)``), so a stage never outlives a parent killed with
``kill -9``, and checks that the parent is still there; :func:`handle_signals` turns the
three signals into :class:`~pipeline.errors.Interrupted`. Publishing steps also refuse to
run in an orphan (:func:`pipeline.common.check_not_orphaned`).

A process stops once: the first stop request (a signal, or a parent found gone) raises
:class:`~pipeline.errors.Interrupted`, and later signals are ignored while its cleanup runs
(removing a temporary folder, writing the record). Without that, a parent's death is seen
twice, by the orphan check and by the kernel's SIGTERM, and the second interrupts the
cleanup of the first, leaving a half-written folder behind. A cleanup that hangs is still
killed: ``run`` kills the stage's group after :data:`GRACE_SECONDS`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from pipeline.errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_SECONDS = 30.0
PARENT_ENV = "QLORA_MERGE_PARENT"
_PR_SET_PDEATHSIG = 1


_stopping: list[int] = []  # the signal this process is stopping for, once it is


def stop(signum: int) -> Interrupted:
    """The :class:`Interrupted` for a stop request, with this process put in stopping mode: from
    now on the three signals are ignored, so that the cleanup this exception triggers runs to
    its end. Raise what it returns."""
    if not _stopping:
        _stopping.append(signum)
    return Interrupted(signum)


def _raise(signum, frame):
    if _stopping:  # already stopping: let the cleanup finish
        return
    raise stop(signum)


def handle_signals() -> dict:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in this process's main thread (the
    first one only, see the module's docstring); returns the handlers they had (for
    :func:`restore_signals`)."""
    _stopping.clear()
    return {s: signal.signal(s, _raise) for s in HANDLED}


def restore_signals(previous: dict) -> None:
    """Put back the handlers :func:`handle_signals` replaced."""
    for s, h in previous.items():
        signal.signal(s, h)


def become_stage_child() -> None:
    """In a stage process started by ``run``: get SIGTERM when the parent dies, and stop at once if
    it already has. A no-op in a stage run by hand (``qlora-merge stage``).

    Raises:
        Interrupted: (SIGTERM) the parent is already gone.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the publish-time orphan check still holds
        pass
    if os.getppid() != int(parent):
        raise stop(signal.SIGTERM)


def peak_rss_of(pid: int) -> int | None:
    """Peak resident memory (``VmHWM``) of a running process, in bytes; None when unknown."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class ChildResult:
    """How a stage process ended: ``returncode`` (negative: killed by that signal), ``peak_rss_bytes``
    (last sampled, None if never), ``stopped_by`` (the signal the parent forwarded, if any) and
    ``killed_after_grace`` (it did not stop within :data:`GRACE_SECONDS`, or at a second signal,
    and was killed)."""

    returncode: int
    peak_rss_bytes: int | None = None
    stopped_by: Interrupted | None = None
    killed_after_grace: bool = False


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def run_child(cmd: list[str], env: dict, poll_seconds: float = 0.5) -> ChildResult:
    """Run ``cmd`` in a process group of its own and wait for it, sampling its peak memory.

    A signal handled by this process (:func:`handle_signals`) while it waits is forwarded to the
    child's group; the child gets :data:`GRACE_SECONDS` to stop (a second signal: at once), then
    the group is killed. The result's ``stopped_by`` is then set; the caller exits with its code.
    """
    proc = subprocess.Popen(cmd, env={**env, PARENT_ENV: str(os.getpid())}, process_group=0, stdin=subprocess.DEVNULL)
    res = ChildResult(returncode=0)
    try:
        while True:
            try:
                res.returncode = proc.wait(timeout=poll_seconds)
                return res
            except subprocess.TimeoutExpired:
                rss = peak_rss_of(proc.pid)
                if rss is not None:
                    res.peak_rss_bytes = max(res.peak_rss_bytes or 0, rss)
    except Interrupted as e:
        res.stopped_by = e
    _killpg(proc.pid, res.stopped_by.signum)
    again: list[int] = []

    def second(signum, frame):  # a second Ctrl-C: do not wait for the stage's cleanup
        again.append(signum)
        _killpg(proc.pid, signal.SIGKILL)

    for s in HANDLED:
        signal.signal(s, second)
    deadline = time.monotonic() + GRACE_SECONDS
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        _killpg(proc.pid, signal.SIGKILL)
    res.returncode = proc.wait()
    res.killed_after_grace = res.returncode == -signal.SIGKILL
    for s in HANDLED:  # this process is stopping too: later signals are ignored
        signal.signal(s, _raise)
    stop(res.stopped_by.signum)
    return res


def describe_kill(stage: str, signum: int, peak_rss: int | None) -> str:
    """The message for a stage process killed by signal ``signum`` (not one this run sent): the
    signal, the stage's last peak memory, the machine's memory, and how to need less."""
    import psutil

    def gib(n: int) -> str:
        return f"{n / 2**30:.1f} GiB"

    mem = psutil.virtual_memory()
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    why = " (on Linux most often the out-of-memory killer)" if signum == signal.SIGKILL else ""
    peak = f"its peak resident memory was {gib(peak_rss)} when last seen" if peak_rss else "its peak memory is unknown"
    return (
        f"stage {stage} was killed by {name}{why}; {peak}; this machine has {gib(mem.total)} of memory "
        f"({gib(mem.available)} available now). To need less memory, set runtime.offload: on (verify and "
        "evaluate one decoder layer at a time, GPTQ with disk offload), lower eval.batch_size, or drop "
        "eval.baselines; then run the same command again to resume from this stage."
    )
