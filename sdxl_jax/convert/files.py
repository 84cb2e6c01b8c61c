"""Reading PyTorch weight files into `{key: np.ndarray}`: safetensors (no torch needed), sharded sets,
and legacy pickles loaded safely (`torch.load(weights_only=True)`; torch required only for those);
`Prefetch`, which reads a loader's files into the page cache ahead of it; and `atomic_output`, through
which every converter's output (folder or file) is written.

A diffusers component folder holds `{stem}[.{variant}].safetensors`, a sharded
`{stem}[.{variant}].safetensors.index.json`, or the legacy `.bin` equivalents; `component_weights` finds
the one file to read, preferring safetensors.
"""

import contextlib
import json
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from sdxl_jax import storage
from sdxl_jax.convert.mapping import ConversionError, dtype_of, shape_of

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class TorchPickle(Mapping):
    """A `.bin`/`.ckpt`/`.pt` state dict, unpickled with `weights_only=True` (tensors and plain containers
    only; a pickle that needs arbitrary code to load is refused) and, in torch's zip format, memory-mapped,
    so a tensor's bytes are read when it is asked for. Lightning-style `{"state_dict": ...}` wrappers are unwrapped;
    non-tensor entries (step counters) are left out. bf16 tensors come back as fp32 numpy (numpy has
    no bfloat16 of its own in torch's export), which the caller may cast back."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            import torch
        except ModuleNotFoundError as e:
            raise ConversionError(f"{self.path}: reading a PyTorch pickle needs torch (pip install torch); "
                                  "safetensors files need no torch") from e  # fmt: skip
        try:
            # memory-mapped where torch allows it (the zip format, torch >= 1.6); a legacy pickle (torchvision's
            # VGG16, lpips' heads) is read whole
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(self.path))
        except Exception as e:  # noqa: BLE001  torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise ConversionError(f"{self.path}: refused or unreadable as a weights-only PyTorch pickle "
                                  f"(code payloads are never executed): {str(e).splitlines()[0]}") from e  # fmt: skip
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ConversionError(f"{self.path}: expected a state dict, found a {type(obj).__name__}")
        self._tensors = {k: v.detach() for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self._bf16 = torch.bfloat16

    def __getitem__(self, key: str) -> np.ndarray:
        value = self._tensors[key]
        return (value.float() if value.dtype == self._bf16 else value).numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> np.dtype:
        value = self._tensors[key]
        return np.dtype(np.float32) if value.dtype == self._bf16 else np.dtype(str(value.dtype).removeprefix("torch."))


def open_state_dict(path) -> Mapping[str, np.ndarray]:
    """One weights file or sharded set (its `*.index.json`) as a lazy mapping, by suffix: keys, shapes and
    dtypes from the headers, each tensor read when asked for (`shape_of`, `dtype_of`). Safetensors may
    be in a bucket; pickles must be local."""
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.name.endswith(".index.json"):
        return ShardedState(path)
    if path.suffix == ".safetensors":
        return LazySafetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return TorchPickle(path)
    raise ConversionError(f"{path}: unknown weights format (expected .safetensors or one of {PICKLE_SUFFIXES})")


def source_files(state: Mapping) -> list:
    """The files an `open_state_dict` mapping reads from (a sharded set's shards in order)."""
    if isinstance(state, ShardedState):
        return [file for shard in state.shards for file in source_files(shard)]
    return [state.path]


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one weights file or sharded set (its `*.index.json`), by suffix."""
    state = open_state_dict(path)
    return {key: state[key] for key in state}


class ShardedState(Mapping):
    """A sharded weights set (`*.safetensors.index.json` / `*.bin.index.json`) as one lazy mapping."""

    def __init__(self, path):
        path = storage.path(path)
        weight_map = json.loads(path.read_text())["weight_map"]
        self._where: dict[str, Mapping] = {}
        for shard in sorted(set(weight_map.values())):
            state = open_state_dict(path.parent / shard)
            if overlap := self._where.keys() & set(state):
                raise ConversionError(f"{shard}: tensors present in two shards: {sorted(overlap)[:5]}")
            self._where |= dict.fromkeys(state, state)
        if missing := set(weight_map) - self._where.keys():
            raise ConversionError(f"{path}: index names tensors no shard holds: {sorted(missing)[:5]}")
        self.shards = list({id(state): state for state in self._where.values()}.values())

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self._where[key], key)

    def dtype(self, key: str) -> np.dtype:
        return dtype_of(self._where[key], key)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file, or of a sharded set given its `*.safetensors.index.json`."""
    path = storage.path(path)
    if not (path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")):
        raise ConversionError(f"{path}: not a .safetensors file")
    return read_state_dict(path)


def component_weights(folder: str | Path, stem: str, variant: str | None = None) -> Path:
    """The weights file of a diffusers component folder: safetensors first, then legacy `.bin`."""
    folder = storage.path(folder)
    infix = f".{variant}" if variant else ""
    for suffix in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
        if (folder / f"{stem}{infix}{suffix}").exists():
            return folder / f"{stem}{infix}{suffix}"
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "nothing (not a folder)"
    raise FileNotFoundError(f"no {stem}{infix}.safetensors / .bin (or sharded index) in {folder}; it holds {found}")


def stored_dtype(state) -> str:
    """The floating dtype holding most of a state dict's parameters ("float16", "bfloat16", "float32")."""
    counts: dict[str, int] = {}
    for key in state:
        dtype = dtype_of(state, key)
        if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":
            counts[dtype.name] = counts.get(dtype.name, 0) + int(np.prod(shape_of(state, key)))
    if not counts:
        raise ConversionError("the state dict holds no floating-point tensors")
    return max(counts, key=counts.get)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16", "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


ALIGNMENT = 64  # XLA:CPU takes a host array this aligned without copying it (`jax.device_put`)


def aligned_empty(count: int, dtype) -> np.ndarray:
    """An uninitialised 1-D array of `count` elements whose data starts on an `ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(count * dtype.itemsize + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + count * dtype.itemsize].view(dtype)


def _read_into(path, offset: int, buffer: np.ndarray) -> int:
    """Fill `buffer` (uint8) from `path` (local or in a bucket) at `offset`; the number of bytes read
    (short at end of file)."""
    done, view = 0, memoryview(buffer)
    if storage.is_remote(path):
        with storage.path(path).open("rb") as f:  # a ranged read
            f.seek(offset)
            while done < len(view) and (n := f.readinto(view[done:])) > 0:
                done += n
        return done
    with open(path, "rb", buffering=0) as f:
        while done < len(view) and (n := os.preadv(f.fileno(), [view[done:]], offset + done)) > 0:
            done += n  # one read returns at most ~2 GiB on Linux
    return done


ByteRange = tuple[Path, int, int]  # (local file, offset, length)


class Prefetch:
    """Reads byte ranges of local files into the page cache ahead of a loader, from a background thread.

        with Prefetch(state.byte_ranges(keys_in_read_order)):
            ...read the tensors...

    Each range is asked for with `posix_fadvise(WILLNEED)` in `STEP`-byte pieces, in the order given
    (the loader's): the call waits for the disk but copies nothing, so a checkpoint not yet in the page
    cache loads about as fast as one that is, the disk working while the loader converts and places.
    Remote files (and systems without `posix_fadvise`) are skipped. Leaving the block stops the thread
    within one piece.
    """

    STEP = 4 << 20  # larger requests are cut short by the kernel's read-ahead limit

    def __init__(self, ranges: Iterable[ByteRange]):
        self._ranges = [(p, o, n) for p, o, n in ranges if not storage.is_remote(p)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def __enter__(self) -> "Prefetch":
        if self._ranges and hasattr(os, "posix_fadvise"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        fds = {}
        try:
            for path, offset, length in self._ranges:
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                for start in range(offset, offset + length, self.STEP):
                    if self._stop.is_set():
                        return
                    os.posix_fadvise(fds[path], start, min(self.STEP, offset + length - start), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only an optimisation: the loader's own read reports a missing or unreadable file
        finally:
            for fd in fds.values():
                os.close(fd)


def whole_files(paths: Iterable) -> list[ByteRange]:
    """Every local file among `paths` (files or folders, walked in sorted order) as one `ByteRange` each."""
    ranges = []
    for path in map(storage.path, paths):
        if storage.is_remote(path) or not path.exists():
            continue
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if path.is_dir() else [Path(path)]
        ranges += [(file, 0, file.stat().st_size) for file in files]
    return ranges


class LazySafetensors(Mapping):
    """A `.safetensors` file as a read-only mapping that reads each tensor only when asked for it.

    Lets a conversion stream a multi-GB checkpoint: keys come from the header, and a tensor's memory can
    be dropped as soon as its converted form exists. Tensors are read with plain file reads rather than
    through a memory map, whose pages would otherwise stay resident (a second copy of the file).
    """

    def __init__(self, path):
        self.path = storage.path(path)
        try:
            if not storage.is_remote(self.path):
                with safe_open(self.path, framework="np") as f:  # validates the header
                    f.metadata()
            with self.path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self._metadata = header.get("__metadata__") or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{self.path}: not a readable safetensors file ({e}); truncated or corrupt?") from e
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._entries = header

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            what = f"tensor {key} has dtype {entry['dtype']}"
            raise ConversionError(f"{self.path}: {what}, which this loader cannot read")
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        array = aligned_empty(count, dtype)  # so that placing it on a CPU device copies nothing
        if _read_into(self.path, self._data_start + begin, array.view(np.uint8)) != end - begin:
            raise ConversionError(f"{self.path}: tensor {key} is cut short; truncated file?")
        return array.reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(_SAFETENSORS_DTYPES.get(self._entries[key]["dtype"], np.void))

    def metadata(self) -> dict[str, str]:
        return self._metadata

    def byte_ranges(self, keys: Iterable[str]) -> list[ByteRange]:
        """Where `keys`' tensors lie in the file, in the order given (for `Prefetch`); adjacent ones merged."""
        ranges: list[ByteRange] = []
        for key in keys:
            begin, end = self._entries[key]["data_offsets"]
            begin, end = begin + self._data_start, end + self._data_start
            if ranges and ranges[-1][1] + ranges[-1][2] == begin:
                ranges[-1] = (self.path, ranges[-1][1], end - ranges[-1][1])
            else:
                ranges.append((self.path, begin, end - begin))
        return ranges

    def offset(self, key: str) -> int:
        """Where `key`'s tensor starts in the file (bytes)."""
        return self._data_start + self._entries[key]["data_offsets"][0]


def refuse_existing(path) -> None:
    if storage.path(path).exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")


@contextlib.contextmanager
def atomic_output(path, folder: bool, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary sibling of `path` (a folder or a file) to write into, renamed to `path` on success and
    removed on any failure or interrupt, so nothing half-written ever stands at `path`. Refuses an
    existing `path` (before and after the writing). The output gets the umask's permissions.

    `path` in a bucket (no renames there): the output is written to a local temporary folder, then
    uploaded with the files named in `last` (its index) after all others; a failed upload is removed."""
    if storage.is_remote(path):
        refuse_existing(path)
        with tempfile.TemporaryDirectory(prefix="sdxl_jax-upload-") as staging:
            tmp = Path(staging) / storage.path(path).name
            if folder:
                tmp.mkdir()
            yield tmp
            storage.upload_tree(tmp, path, last)
        return
    path = Path(path)
    refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod((0o777 if folder else 0o666) & ~umask)  # mkdtemp/mkstemp make it private; the output is not
    try:
        yield tmp
        refuse_existing(path)  # appeared while we were writing
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
