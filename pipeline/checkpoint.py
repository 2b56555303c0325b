"""Reading and writing checkpoints: the one place that opens safetensors files and ``config.json``.

Shaped like mergekit's I/O layer: :class:`Checkpoint` reads the shard index into a map from
tensor name to file, shape and dtype (headers only) and hands out one tensor at a time,
keeping one file open; :class:`ShardWriter` writes size-capped shards and the index last;
:class:`AdapterFiles` reads a PEFT adapter folder under one pickle policy. Hub ids are
resolved to a local snapshot once (:func:`resolve`). No model code and no merge math here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

from pipeline.errors import InputError

ADAPTER_PREFIX = "base_model.model."
INDEX_FILE = "model.safetensors.index.json"
# bitsandbytes 4-bit checkpoints keep each weight's quant state beside it, e.g.
# "<module>.weight.quant_state.bitsandbytes__nf4" (a JSON blob with the unpacked shape).
_BNB_STATE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__\w+$")
_BNB_AUX = re.compile(r"^(?P<weight>.+\.weight)\.(?:absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.\w+)$")

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: its file, shape and safetensors dtype (``"BF16"``, ``"U8"``, ...).

    For a bitsandbytes 4-bit weight, ``shape`` is the packed storage shape (``[n, 1]``) and
    ``logical_shape`` the unpacked ``[out, in]`` from its quant state; otherwise both are equal.
    """

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str
    logical_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=_ST_DTYPES.get(self.dtype, torch.uint8)).element_size()

    @property
    def numel(self) -> int:
        n = 1
        for d in self.logical_shape:
            n *= d
        return n


def _read_json(f: Path, what_to_do: str) -> dict:
    """A JSON object from ``f``.

    Raises:
        InputError: missing, not JSON, or not an object; the message ends with ``what_to_do``.
    """
    if not f.is_file():
        raise InputError(f"'{f}' is missing. {what_to_do}")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"'{f}' is not valid JSON ({e}). {what_to_do}") from None
    if not isinstance(data, dict):
        raise InputError(f"'{f}' must hold a JSON object. {what_to_do}")
    return data


def resolve(path_or_id: str | os.PathLike, weights: bool = True, what: str = "base.path") -> Path:
    """A local folder for a checkpoint: the path itself, or the hub snapshot of a hub id.

    A hub id is downloaded (or taken from the Hugging Face cache) once: the configs and
    tokenizer files, plus the weights when ``weights``.

    Raises:
        InputError: the hub cannot be reached or has no such repository (names ``what``).
    """
    p = Path(path_or_id)
    if p.exists():
        return p
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", "*.jinja", "tokenizer*"]
    if weights:
        patterns += ["*.safetensors"]
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=patterns))
    except Exception as e:  # hub errors come in many types (offline, gated, not found, network)
        raise InputError(
            f"{what}: '{path_or_id}' is not a local folder, and as a hub id it could not be fetched "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the id and your "
            "network/token, or point it at a local folder."
        ) from None


def read_config(path_or_id: str | os.PathLike, what: str = "base.path") -> dict:
    """``config.json`` of a checkpoint (local folder or hub id).

    Raises:
        InputError: missing or invalid.
    """
    folder = resolve(path_or_id, weights=False, what=what)
    return _read_json(
        folder / "config.json", f"{what} must be a Hugging Face checkpoint folder (config.json + weights)."
    )


def stored_dtype(path_or_id: str | os.PathLike) -> Optional[str]:
    """The dtype a checkpoint's ``config.json`` declares (``bnb_4bit_compute_dtype`` for a base
    saved in bitsandbytes 4-bit), as ``"float16"``/``"bfloat16"``/``"float32"``; None when it
    declares none or the config cannot be read here."""
    try:
        c = read_config(path_or_id)
    except InputError:
        return None
    d = str(c.get("dtype") or c.get("torch_dtype") or (c.get("text_config") or {}).get("dtype") or "")
    qc = c.get("quantization_config") or {}
    if qc.get("bnb_4bit_compute_dtype"):
        d = str(qc["bnb_4bit_compute_dtype"]).removeprefix("torch.")
    return d if d in ("float16", "bfloat16", "float32") else None


def tied_embeddings(config: dict) -> bool:
    """Whether a ``config.json`` ties input and output embeddings (transformers' default: True)."""
    return bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", True)))


class Checkpoint:
    """A Hugging Face safetensors checkpoint, read one tensor at a time.

    ``model.safetensors.index.json`` is honoured when present; otherwise every
    ``*.safetensors`` in the folder is read. Only headers are read until :meth:`get`.

    Raises (on construction):
        InputError: the folder has no ``config.json``, a shard named by the index is missing,
            a file is not readable safetensors, or the weights are only in pickle files.
    """

    def __init__(self, path_or_id: str | os.PathLike, what: str = "base.path"):
        self.what = what
        self.folder = resolve(path_or_id, weights=True, what=what)
        self.config = _read_json(
            self.folder / "config.json", f"{what} must be a Hugging Face checkpoint folder (config.json + weights)."
        )

    @cached_property
    def files(self) -> list[Path]:
        """The safetensors files, in the index's order (or sorted by name)."""
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index, f"Re-save the checkpoint at {self.what}.").get("weight_map", {})
            files = [self.folder / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(
                    f"{self.what}: shard(s) {missing} named by {INDEX_FILE} are missing from "
                    f"{self.folder}. Re-download the checkpoint."
                )
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files and any(self.folder.glob("*.bin")):
            raise InputError(
                f"{self.what}: '{self.folder}' holds only pickle (.bin) weights; this pipeline reads "
                "safetensors (a pickle can run code). Convert it once: "
                "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)."
            )
        return files

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Tensor name -> :class:`TensorInfo`, from the headers (bnb quant-state blobs are read for shapes)."""
        from safetensors import safe_open

        raw: dict[str, tuple[Path, tuple, str]] = {}
        logical: dict[str, tuple] = {}
        for f in self.files:
            try:
                with safe_open(f, "pt") as h:
                    for k in h.keys():
                        sl = h.get_slice(k)
                        raw[k] = (f, tuple(sl.get_shape()), sl.get_dtype())
                        if m := _BNB_STATE.match(k):
                            state = json.loads(bytes(h.get_tensor(k).tolist()))
                            logical[m.group("weight")] = tuple(state["shape"])
            except InputError:
                raise
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise InputError(
                    f"'{f}' is not a readable safetensors file ({type(e).__name__}: {e}). Re-download or re-save it."
                ) from None
        return {k: TensorInfo(k, f, s, d, logical.get(k, s)) for k, (f, s, d) in raw.items()}

    @property
    def quantization_config(self) -> Optional[dict]:
        return self.config.get("quantization_config")

    @property
    def is_bnb_4bit(self) -> bool:
        qc = self.quantization_config or {}
        return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))

    @property
    def tied(self) -> bool:
        return tied_embeddings(self.config)

    def weight_names(self) -> list[str]:
        """Tensor names without bitsandbytes' quant-state companions (one per model parameter/buffer)."""
        return [k for k in self.tensors if not (_BNB_STATE.match(k) or _BNB_AUX.match(k))]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> logical shape (``[out, in]`` for a bnb 4-bit weight) of every weight."""
        return {k: self.tensors[k].logical_shape for k in self.weight_names()}

    def quant_state_tensors(self, weight: str) -> dict[str, torch.Tensor]:
        """A bnb 4-bit weight's stored quant state (``absmax``, ``quant_map``, ``nested_*``, the
        JSON blob), keyed as bitsandbytes' ``QuantState.from_dict`` expects (prefix stripped)."""
        pre = weight + "."
        return {k[len(pre) :]: self.get(k) for k in self.tensors if k.startswith(pre)}

    def nbytes(self) -> int:
        """Bytes of all tensors as stored."""
        return sum(t.nbytes for t in self.tensors.values())

    def get(self, name: str, dtype: torch.dtype | None = None, via: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from its file into fresh memory (:func:`read_tensor`); with ``dtype``,
        converted to it (through ``via`` first, when given) as it is read."""
        return read_tensor(self.tensors[name].file, name, self._headers, dtype=dtype, via=via, ahead=True)

    @cached_property
    def _headers(self) -> dict:
        return {}


def _header(path: Path, cache: dict) -> tuple[dict, int]:
    """(safetensors header, byte offset of the data section) of ``path``, cached in ``cache``."""
    if path not in cache:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            cache[path] = (json.loads(fh.read(n)), 8 + n)
    return cache[path]


_CONVERT_CHUNK_BYTES = 64 << 20  # stored bytes read per step when converting while reading


def _pread_into(fh, view: memoryview, offset: int, path, name: str) -> None:
    pos = 0
    while pos < len(view):
        got = os.preadv(fh.fileno(), [view[pos:]], offset + pos)
        if got <= 0:
            raise InputError(f"'{path}' ends inside tensor '{name}': the file is truncated. Re-download it.")
        pos += got


def read_tensor(
    path: Path,
    name: str,
    cache: dict | None = None,
    dtype: torch.dtype | None = None,
    via: torch.dtype | None = None,
    ahead: bool = False,
) -> torch.Tensor:
    """One tensor of a safetensors file, read with ``pread`` into a fresh tensor.

    Unlike ``safetensors.safe_open`` (a memory map, whose pages count in the process's resident
    memory once touched, and which hands out the same shared buffer on every read), this
    allocates exactly the tensor: reading a 70B checkpoint one tensor at a time keeps the
    resident memory at the tensor being processed.

    With ``dtype`` (and ``via``), the tensor is converted as ``t.to(via).to(dtype)`` one slice
    of 64 MB at a time while it is read, so that memory holds the result and one slice, never
    the stored tensor and its conversion together (a 128256 x 8192 embedding in float32 is
    4.2 GB; read whole and converted, 6.3 GB). Conversions are element-wise: the result is the
    whole-tensor conversion's.

    ``ahead``: have the bytes that follow in the file (twice this tensor, 64 MB to 2 GB) read
    into the page cache in the background while the caller works on this one
    (:class:`_ReadAhead`): checkpoints are read in about their stored order, so the next read
    comes from the page cache instead of waiting on the disk. Page cache, not this process's memory.
    """
    header, start = _header(Path(path), {} if cache is None else cache)
    meta = header[name]
    lo, hi = meta["data_offsets"]
    stored = _ST_DTYPES[meta["dtype"]]
    convert = any(d is not None and d != stored for d in (via, dtype))
    with open(path, "rb", buffering=0) as fh:
        if not convert:
            buf = bytearray(hi - lo)
            _pread_into(fh, memoryview(buf), start + lo, path, name)
            _read_ahead(fh, start + hi, hi - lo, ahead)
            if not buf:
                return torch.empty(meta["shape"], dtype=stored)
            return torch.frombuffer(buf, dtype=stored).reshape(meta["shape"])
        out = torch.empty(meta["shape"], dtype=dtype or via)
        flat, item = out.view(-1), torch.empty((), dtype=stored).element_size()
        step = max(1, _CONVERT_CHUNK_BYTES // item)
        buf = bytearray(min(flat.numel(), step) * item)
        for i in range(0, flat.numel(), step):
            k = min(step, flat.numel() - i)
            view = memoryview(buf)[: k * item]
            _pread_into(fh, view, start + lo + i * item, path, name)
            t = torch.frombuffer(buf, dtype=stored, count=k)
            for d in (via, dtype):
                if d is not None:
                    t = t.to(d)
            flat[i : i + k].copy_(t)
        _read_ahead(fh, start + hi, hi - lo, ahead)
    return out


def _read_ahead(fh, offset: int, nbytes: int, ahead: bool) -> None:
    if ahead and hasattr(os, "posix_fadvise"):
        _ReadAhead.shared().request(fh.name, offset, min(2 << 30, max(64 << 20, 2 * nbytes)))


class _ReadAhead:
    """One background thread that asks the kernel to read file ranges into the page cache
    (``POSIX_FADV_WILLNEED`` in 8 MB steps: the kernel caps each call at its read-ahead window,
    and the calls block while the disk queue is full, so they run off the caller's thread).
    Only the latest request is kept; a new one replaces what is left of the previous one."""

    _instance = None
    STEP = 8 << 20

    def __init__(self):
        import threading

        self._cv = threading.Condition()
        self._job: tuple | None = None
        threading.Thread(target=self._run, name="read-ahead", daemon=True).start()

    @classmethod
    def shared(cls) -> "_ReadAhead":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def request(self, path, offset: int, length: int) -> None:
        with self._cv:
            self._job = (str(path), offset, offset + length)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._job is None:
                    self._cv.wait()
                path, pos, end = self._job
                self._job = None
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                while pos < end:
                    with self._cv:
                        if self._job is not None:  # superseded
                            break
                    os.posix_fadvise(fd, pos, min(self.STEP, end - pos), os.POSIX_FADV_WILLNEED)
                    pos += self.STEP
            except OSError:
                pass
            finally:
                os.close(fd)


class ShardWriter:
    """Write tensors into size-capped safetensors shards as they come, then the index.

    Memory stays at one tensor: each tensor's bytes go to its shard's file at once, behind a
    header area reserved for the whole shard (``header_bytes``; the header is written last,
    padded with spaces, which the safetensors format allows). Shards are named
    ``model-0000i-of-0000n.safetensors`` (``model.safetensors`` when one suffices) and
    ``model.safetensors.index.json`` is written last, as ``transformers`` does. Write into a
    temporary folder (:func:`pipeline.common.publish_dir`): nothing half-written is published.
    """

    def __init__(
        self,
        folder: Path,
        max_shard_bytes: int = 5 * 10**9,
        header_bytes: int = 1 << 20,
        metadata: Optional[dict] = None,
    ):
        self.folder, self.max_bytes, self.header_bytes = Path(folder), max_shard_bytes, header_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shards: list[dict] = []
        self._fh = None
        self._entries: dict = {}
        self._pos = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (a new shard starts once this one would pass the size cap)."""
        t = tensor.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if self._fh is not None and self._pos and self._pos + n > self.max_bytes:
            self._close_shard()
        if self._fh is None:
            self._fh = open(self.folder / f".shard-{len(self._shards):05d}.safetensors", "wb")
            self._fh.seek(8 + self.header_bytes)
            self._entries, self._pos = {}, 0
        st = {v: k for k, v in _ST_DTYPES.items()}[t.dtype]
        self._entries[name] = {"dtype": st, "shape": list(t.shape), "data_offsets": [self._pos, self._pos + n]}
        if n:
            self._fh.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no copy of the tensor
        self._pos += n
        self.total_bytes += n

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self.header_bytes:
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the reserved {self.header_bytes}")
        self._fh.seek(0)
        self._fh.write(self.header_bytes.to_bytes(8, "little") + header + b" " * (self.header_bytes - len(header)))
        self._fh.close()
        self._shards.append(dict(self._entries))
        self._fh = None

    def finish(self) -> list[Path]:
        """Close the last shard, name the shards, write the index (more than one shard). Returns the files."""
        if self._fh is not None or not self._shards:
            if self._fh is None:
                self._fh = open(self.folder / f".shard-{len(self._shards):05d}.safetensors", "wb")
                self._entries, self._pos = {}, 0
            self._close_shard()
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f".shard-{i:05d}.safetensors").rename(self.folder / name)
        if n > 1:
            weight_map = {k: names[i] for i, keys in enumerate(self._shards) for k in keys}
            (self.folder / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2)
            )
        return [self.folder / n for n in names]


# --- adapters ------------------------------------------------------------------------------------

_LORA = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B|embedding_A|embedding_B)(?:\.(?P<part>weight|bias))?$")
_MAGNITUDE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.weight)?$")
_TOKENS = re.compile(r"^(?P<mod>.+)\.token_adapter\.trainable_tokens_delta$")
_OTHER_ADAPTER = re.compile(r"^(?P<mod>.+?)\.(?:lora_\w+|token_adapter)\b")
_NESTED = re.compile(r"(?:\.base_layer)+(?=\.lora_)")
_WRAPPERS = re.compile(r"\.(?:modules_to_save|original_module)(?:\.default)?(?=\.)|\.base_layer(?=\.)")


@dataclass(frozen=True)
class AdapterTensor:
    """One adapter tensor, parsed. ``kind``: ``lora_A``, ``lora_B`` (incl. embedding A/B and LoRA
    biases), ``magnitude`` (DoRA), ``tokens`` (trainable-token rows), ``full`` (a whole tensor the
    adapter replaces: ``modules_to_save``, saved embedding layers, trained biases), ``other``.
    ``module`` is the base module's name; ``target`` the base tensor a ``full`` tensor replaces."""

    key: str
    name: str
    module: str
    kind: str
    target: Optional[str] = None


def parse_adapter_key(key: str) -> AdapterTensor:
    """Parse an adapter state-dict key (``base_model.model.`` prefix optional; the ``.base_layer``
    levels of nested PEFT wrappers, as LoRA on several parameters of one module writes, dropped)."""
    name = _NESTED.sub("", key.removeprefix(ADAPTER_PREFIX))
    if m := _LORA.match(name):
        kind = "lora_A" if m.group("ab") in ("A", "embedding_A") and m.group("part") != "bias" else "lora_B"
        return AdapterTensor(key, name, m.group("mod"), kind)
    if m := _MAGNITUDE.match(name):
        return AdapterTensor(key, name, m.group("mod"), "magnitude")
    if m := _TOKENS.match(name):
        return AdapterTensor(key, name, m.group("mod"), "tokens")
    if m := _OTHER_ADAPTER.match(name):
        return AdapterTensor(key, name, m.group("mod"), "other")
    target = _WRAPPERS.sub("", name)
    return AdapterTensor(key, name, target.rsplit(".", 1)[0], "full", target)


class AdapterFiles:
    """A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), or a hub id.

    One pickle policy: a pickle ``adapter_model.bin`` is read (with ``weights_only=True``) only
    when ``allow_pickle``; everything that reads adapter weights goes through this class.

    Raises (on construction):
        InputError: no ``adapter_config.json``, invalid JSON, no weights file, a pickle-only
            adapter without ``allow_pickle``.
    """

    def __init__(self, path_or_id: str | os.PathLike, allow_pickle: bool = False, what: str = "adapter.path"):
        self.what = what
        self.folder = resolve(path_or_id, weights=True, what=what)
        self.config = _read_json(
            self.folder / "adapter_config.json",
            f"{what} must be the folder PEFT's save_pretrained wrote (adapter_config.json + weights).",
        )
        st, pkl = self.folder / "adapter_model.safetensors", self.folder / "adapter_model.bin"
        if st.is_file():
            self.file, self.pickle = st, False
        elif not pkl.is_file():
            raise InputError(
                f"adapter '{self.folder}' has no adapter_model.safetensors (nor adapter_model.bin); "
                f"point {what} at the folder PEFT's save_pretrained wrote."
            )
        elif not allow_pickle:
            raise InputError(
                f"adapter '{self.folder}' has only a pickle adapter_model.bin, refused: unpickling can "
                "run arbitrary code. Convert it: sd = torch.load('adapter_model.bin', weights_only=True); "
                "safetensors.torch.save_file(sd, 'adapter_model.safetensors'); or, if you trust the "
                "file, set adapter.allow_pickle: true."
            )
        else:
            self.file, self.pickle = pkl, True

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key (as stored) -> shape, from the safetensors header (a pickle is loaded ``weights_only``)."""
        if self.pickle:
            return {k: tuple(v.shape) for k, v in self.state_dict().items()}
        from safetensors import safe_open

        try:
            with safe_open(self.file, "pt") as h:
                return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise InputError(
                f"'{self.file}' is not a readable safetensors file ({type(e).__name__}: {e}). "
                "Re-download or re-save it."
            ) from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (adapters are small: megabytes to a few GB)."""
        if not self.pickle:
            from safetensors.torch import load_file

            return load_file(self.file)
        try:
            return torch.load(self.file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"'{self.file}' could not be read ({type(e).__name__}: {e}).") from None

    @cached_property
    def parsed(self) -> list[AdapterTensor]:
        return [parse_adapter_key(k) for k in self.shapes]

    def changed_modules(self) -> dict[str, list[str]]:
        """The base modules this adapter changes, by how: ``lora`` (LoRA A/B), ``full`` (whole
        weights replaced: ``modules_to_save``, saved embedding layers), ``biases`` (trained
        biases), ``tokens`` (trainable-token rows). Sorted module names."""
        out: dict[str, set] = {"lora": set(), "full": set(), "biases": set(), "tokens": set()}
        for t in self.parsed:
            if t.kind in ("lora_A", "lora_B", "magnitude"):
                out["lora"].add(t.module)
            elif t.kind == "tokens":
                out["tokens"].add(t.module)
            elif t.kind == "full":
                out["biases" if t.target.endswith(".bias") else "full"].add(t.module)
        return {k: sorted(v) for k, v in out.items()}

    @property
    def tokenizer_saved(self) -> bool:
        """Whether training saved its tokenizer beside the adapter."""
        return (self.folder / "tokenizer_config.json").is_file()

    def embedding_rows(self, embed_module: str) -> Optional[int]:
        """Rows of the input embedding the adapter was trained with, when it carries that
        embedding (a saved/``modules_to_save`` copy or LoRA ``embedding_A`` [r, rows]); else None."""
        for t in self.parsed:
            shape = self.shapes[t.key]
            if t.module == embed_module and t.kind == "full" and t.target.endswith("weight") and len(shape) == 2:
                return shape[0]
            if t.module == embed_module and t.kind == "lora_A" and "embedding_A" in t.name:
                return shape[1]
        return None
