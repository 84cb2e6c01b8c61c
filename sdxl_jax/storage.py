"""Where runs read and write: local paths and bucket URLs (`gs://`, `s3://`) as one path type.

    p = storage.path("gs://bucket/run1")        # an `etils.epath.Path`; a local path stays local
    storage.check_writable(p, "--workdir")     # create, write, read back, delete a probe object: fail fast
    storage.make_dirs(p)                       # a local folder; nothing on a bucket
    f = storage.AppendFile(p / "metrics.jsonl")  # appended to, anywhere (see below)
    storage.upload_tree(local_folder, p / "export", last=("sdxl_jax.json",))

`epath` reaches buckets through fsspec (`gcsfs`, `s3fs`); Orbax and TensorStore open `gs://` themselves,
so checkpoints go straight to the bucket (Orbax cannot open `s3://`: `orbax_path` refuses it in one
line). Bucket objects cannot be renamed or appended to: a file that grows (metrics, TensorBoard events)
is spooled locally and uploaded whole at each flush, and a folder that must appear complete or not at
all is written locally and uploaded with its index files last (readers take a folder without its index
for an unfinished one).
"""

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from etils import epath

SCHEMES = {"gs": "Google Cloud Storage", "s3": "Amazon S3"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_HALF_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")  # gs:/bucket: a URL that lost a slash


class StorageError(ValueError):
    """A location that cannot be used: a malformed URL, a missing bucket, no permission."""


def is_remote(location) -> bool:
    return bool(_URL.match(os.fspath(location)))


def path(location) -> epath.Path:
    """`location` (str, `pathlib.Path` or `epath.Path`) as an `epath.Path`, checked: a URL names a known
    scheme and a bucket; `gs:/x` (a URL with one slash, what `pathlib` makes of `gs://x`) is refused."""
    text = os.fspath(location)
    if match := _URL.match(text):
        scheme, rest = match.groups()
        if scheme not in SCHEMES:
            raise StorageError(f"{text}: unknown storage scheme {scheme}:// (known: {', '.join(SCHEMES)})")
        if not rest.split("/", 1)[0]:
            raise StorageError(f"{text}: names no bucket (expected {scheme}://BUCKET/PATH)")
        return epath.Path(text)
    if (match := _HALF_URL.match(text)) and match.group(1) in SCHEMES:
        fixed = f"{match.group(1)}://{text[match.end() :]}"
        raise StorageError(f"{text}: not a URL (one slash after '{match.group(1)}:'); did you mean {fixed}?")
    return epath.Path(text)


def make_dirs(location) -> None:
    """Create a local folder and its parents; nothing on a bucket (objects need no folders)."""
    if not is_remote(location):
        path(location).mkdir(parents=True, exist_ok=True)


def _cause(e: Exception) -> str:
    """The first line of an exception, for a one-line error."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def absolute(location) -> epath.Path:
    """A local path made absolute (Orbax requires it); a URL as it is."""
    p = path(location)
    return p if is_remote(p) else epath.Path(os.path.abspath(p))


ORBAX_SCHEMES = ("gs",)  # what Orbax's TensorStore paths support besides local files


def orbax_path(location, what: str = "checkpoint") -> epath.Path:
    """`absolute(location)` where Orbax can keep a checkpoint: a local path or `gs://`; `s3://` is refused
    (Orbax builds TensorStore specs for local files and GCS only) with what to do instead."""
    p = absolute(location)
    if is_remote(p) and (scheme := os.fspath(p).split("://", 1)[0]) not in ORBAX_SCHEMES:
        raise StorageError(
            f"{what} {p}: Orbax checkpoints cannot live on {scheme}:// (it opens local paths and gs:// only); "
            "use gs://, a local disk, or a mount of the bucket"
        )
    return p


def check_writable(location, what: str = "output location") -> epath.Path:
    """Create `location` (local folders only: buckets have none), write a small probe object into it,
    read it back and delete it. Raises StorageError with one line naming `what` and the cause, so a
    missing bucket, a typo or missing credentials stop a run before any compute."""
    p = path(location)
    probe = p / f".sdxl_jax_probe-{socket.gethostname()}-{os.getpid()}"
    payload = b"sdxl_jax write probe\n"
    try:
        make_dirs(p)
        probe.write_bytes(payload)
        if probe.read_bytes() != payload:
            raise OSError("the probe object read back differs from what was written")
        probe.unlink()
    except Exception as e:  # noqa: BLE001  fsspec backends raise anything from OSError to HttpError
        raise StorageError(f"{what} {p} is not usable: {_cause(e)}") from None
    return p


def check_readable(location, what: str = "input") -> epath.Path:
    """`location` exists (a file, a folder, or a bucket prefix holding objects); else StorageError."""
    p = path(location)
    try:
        found = p.exists()
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"{what} {p} is not readable: {_cause(e)}") from None
    if not found:
        raise FileNotFoundError(f"no such file or folder: {p}")
    return p


class AppendFile:
    """A file written by appending, wherever it lives. Locally it is the file itself (opened for
    appending). A bucket object cannot be appended to, so there the whole content lives in a local
    spool (starting from the object's current content, so a resumed run continues it) and is uploaded
    at every `flush`."""

    def __init__(self, location):
        self.path = path(location)
        self.remote = is_remote(self.path)
        if self.remote:
            self._file = tempfile.TemporaryFile()
            if self.path.exists():
                self._file.write(self.path.read_bytes())
        else:
            self._file = open(self.path, "ab")  # noqa: SIM115  (closed in close())

    def write(self, data: bytes | str) -> None:
        self._file.write(data.encode() if isinstance(data, str) else data)

    def flush(self) -> None:
        self._file.flush()
        if self.remote:
            self._file.seek(0)
            with self.path.open("wb") as out:
                shutil.copyfileobj(self._file, out, 16 * 2**20)
            self._file.seek(0, os.SEEK_END)

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def upload_tree(local: str | Path, destination, last: tuple[str, ...] = ()) -> None:
    """Copy the file or folder `local` to `destination` (must not exist); files named in `last` (at any
    depth) are copied after all others, so a reader that checks for them never sees a partial folder.
    On failure what was copied is removed (best effort) and the error re-raised."""
    local, dest = Path(local), path(destination)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; refusing to overwrite it")
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)  # stable: the index files go last
    try:
        for file in files:
            target = dest if file == local else dest / file.relative_to(local).as_posix()
            make_dirs(target.parent)
            with open(file, "rb") as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 16 * 2**20)
    except BaseException:
        remove(dest)
        raise


def remove(location) -> None:
    """Delete a file or folder (prefix) if present; errors are ignored (cleanup after a failure)."""
    p = path(location)
    try:
        if p.is_dir():
            p.rmtree()
        elif p.exists():
            p.unlink()
    except Exception:  # noqa: BLE001, S110
        pass
