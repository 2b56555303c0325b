"""Small shared pieces with no model code: progress lines, dtypes by name, atomic writes of
files and artefact folders, sizes on disk, and :func:`quiet_libraries` (called by the CLI,
the tests and the demo; importing this module changes nothing)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def quiet_libraries() -> None:
    """Silence library start-up noise that says nothing to a user of this job (bitsandbytes'
    missing optional ``kernels`` package, torchao's CUDA-only extensions on a CPU build,
    GPTQModel's banner and INFO tables) and set the environment GPTQModel and tokenizers need
    on a small CPU machine. Idempotent; call it once at the start of a process."""
    for name in ("bitsandbytes", "torchao", "torch.utils._pytree", "tokenicer", "gptqmodel"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    warnings.filterwarnings("ignore", message=".*register_constant.*")
    try:
        from logbar import LogBar  # GPTQModel's logger (imported by peft whenever gptqmodel is installed)

        LogBar.shared().setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def within(x: float, bound: float) -> bool:
    """``x <= bound`` written so that NaN (and +inf) fail: every bound in the pipeline fails closed."""
    return bool(x <= bound) and x == x


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no inf/NaN. ``torch.aminmax`` propagates NaN and keeps infinities, so
    the result equals ``torch.isfinite(t).all()``; it reads the tensor once and allocates nothing
    (``isfinite`` builds a bool tensor of the same size: 0.5 GB and seconds for a 128256 x 4096
    bfloat16 embedding). Non-floating and empty tensors are finite."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def log(msg: str) -> None:
    """Print a progress line to stderr (stdout stays free for machine-readable output)."""
    print(f"[qlora-merge] {msg}", file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status`` (the high-water mark of this program's own memory).
    ``ru_maxrss`` is not used there: a process started with fork/vfork + exec inherits its
    parent's high-water mark (``exec`` folds the old address space's peak into it), so every
    stage process would report at least the peak of the ``run`` process that started it.
    Elsewhere: ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def release_freed_memory() -> None:
    """Hand memory freed inside this process back to the system (glibc's ``malloc_trim(0)``; a
    no-op elsewhere). Tensors of a few MB are freed into glibc's heap, which keeps them: loading a
    model (each weight read, converted and the stored copy dropped) leaves hundreds of MB counted in
    the resident memory that nothing uses. Called after each model load and release."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl), or no malloc_trim
        pass


_WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def check_not_orphaned() -> None:
    """Refuse to publish from a stage process whose ``run`` parent has died (``QLORA_MERGE_PARENT``
    names the parent it was started by); a no-op in any other process.

    Raises:
        Interrupted: (SIGTERM) the parent is gone: nothing may be published any more.
    """
    parent = os.environ.get("QLORA_MERGE_PARENT")
    if parent and os.getppid() != int(parent):
        import signal

        from pipeline.processes import stop

        raise stop(signal.SIGTERM)


def write_error(path: Path, e: OSError):
    """The :class:`~pipeline.errors.InputError` for a write that failed on a full, read-only or
    forbidden disk (naming the folder), or None for any other ``OSError``."""
    if e.errno not in _WRITE_ERRNOS:
        return None
    from pipeline.errors import InputError

    return InputError(
        f"writing '{path}' failed ({e.strerror}); free space or make '{Path(path).parent}' writable "
        "(or set output.dir to another folder), then run again."
    )


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Write an artefact folder atomically: yield a temporary sibling, rename it to
    ``final`` only if the block finishes. On error the temporary folder is removed and
    ``final`` is left as it was (absent or the previous complete artefact).

    In a stage process whose ``run`` parent has died, nothing is published
    (:func:`check_not_orphaned`).

    Raises:
        InputError: the folder cannot be written (read-only or full disk), naming it.
        Interrupted: the parent ``run`` is gone.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        from pipeline.errors import InputError

        raise InputError(
            f"cannot write in '{final.parent}' ({e.strerror}); make it writable or set output.dir to another folder."
        ) from None
    try:
        yield tmp
        check_not_orphaned()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if err := write_error(final, e):
            raise err from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as e:
        if err := write_error(final, e):
            raise err from None
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder, then rename).

    Raises:
        InputError: the disk is full, read-only or forbids writing (naming the folder); the
            temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err := write_error(path, e):
            raise err from None
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temporary file, then rename); errors as :func:`write_text`."""
    write_text(path, json.dumps(obj, indent=2, default=str))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file's content (no error handling: for files this project wrote itself)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def dir_size_bytes(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
