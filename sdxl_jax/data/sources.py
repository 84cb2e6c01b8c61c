"""Random-access sources of (image, captions) records: an image folder, WebDataset tars, TFDS, prepared shards.

Every raw source is a sequence: `len(src)` records, `src[i]` a `RawRecord`:

    key       str, unique within the source (relative path, tar key, "split/index")
    image     bytes, or a filesystem path (folders: PIL then reads only what it needs)
    captions  list of str (maybe empty), parsed by `captions.parse_captions`
    repairs   list of str, notes such as "caption_not_utf8"
    aesthetic float or None, from a sidecar json / metadata field `aesthetic_score` or `aesthetic`

Layouts:

    FolderSource   img.jpg + img.txt (+ img.json), or `metadata.jsonl` lines {"file_name", "text", ...}
                   (Hugging Face imagefolder; `text` may be a list), recursively, sorted by path
    TarSource      img2dataset / WebDataset shards: members `key.jpg`, `key.txt`, `key.json`, read by
                   offset from the uncompressed tar, never extracted (member names are only keys)
    TfdsSource     any TFDS dataset with an image and a text feature, via `tfds.data_source`
                   (ArrayRecord, random access, no TensorFlow); images are read undecoded
    PreparedSource this package's shards (see `prepare`); records are dicts (`records.decode_record`)

Sources are picklable and open files lazily, so grain worker processes each open their own handles.
"""

import json
import os
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sdxl_jax import storage
from sdxl_jax.data.captions import parse_captions
from sdxl_jax.data.records import decode_record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"


class RawRecord(NamedTuple):
    key: str
    image: bytes | str
    captions: list[str]
    repairs: list[str]
    aesthetic: float | None


def _aesthetic(meta: dict | None) -> float | None:
    for name in ("aesthetic_score", "aesthetic"):
        if meta and isinstance(meta.get(name), (int, float)):
            return float(meta[name])
    return None


def _read_json(raw: bytes | None) -> dict | None:
    """A sidecar json; unreadable or non-object json counts as absent (metadata is optional)."""
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _record(key: str, image, caption_raw, meta: dict | None) -> RawRecord:
    if caption_raw is None and meta:  # img2dataset puts the caption in the json too
        caption_raw = meta.get("caption", meta.get("text"))
    captions, repairs = parse_captions(caption_raw)
    return RawRecord(key, image, captions, repairs, _aesthetic(meta))


class FolderSource:
    """Images under `root` (recursively), captions from sidecar files or `metadata.jsonl`. `root` may be
    in a bucket (`gs://...`): it is listed once, and each image is then read whole (locally PIL reads only
    what it needs from the path)."""

    def __init__(self, root: str | Path, caption_ext: str = ".txt"):
        self.root = storage.path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.caption_ext = caption_ext
        self.paths: list[str] = []
        self.metadata: dict[str, dict] = {}
        bare = lambda p: str(p).split("://", 1)[-1]  # a bucket's walk may leave out the scheme
        for dirpath, dirnames, filenames in self.root.walk():
            dirnames.sort()
            rel = Path(os.path.relpath(bare(dirpath), bare(self.root)))
            for name in sorted(filenames):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    self.paths.append(str(rel / name))
                elif name == METADATA_FILE:
                    self._read_metadata(self.root / rel / name, rel)
        self.paths.sort()

    def _read_metadata(self, path, rel: Path) -> None:
        for n, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = str(rel / entry["file_name"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{n}: a metadata.jsonl line needs a JSON object with file_name ({e})"
                ) from None
            self.metadata[os.path.normpath(name)] = entry

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> RawRecord:
        rel = self.paths[i]
        path = self.root / rel
        image = path.read_bytes() if storage.is_remote(path) else str(path)
        entry = self.metadata.get(os.path.normpath(rel))
        if entry is not None:
            return _record(rel, image, entry.get("text"), entry)
        stem = path.with_suffix("")
        caption_file = stem.with_name(stem.name + self.caption_ext)
        caption = caption_file.read_bytes() if caption_file.is_file() else None
        meta_file = stem.with_name(stem.name + ".json")
        meta = _read_json(meta_file.read_bytes()) if meta_file.is_file() else None
        return _record(rel, image, caption, meta)


class TarSource:
    """WebDataset-style shards. The key of a member is its path up to the first dot of its file name."""

    _FIELDS = ("image", "txt", "json")

    def __init__(self, paths: list[str | Path]):
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise ValueError("no tar shards given")
        keys, spans = [], []  # spans: [N, 7] (shard, image offset, size, txt offset, size, json offset, size)
        self.no_image = 0  # keys with a caption or json but no image member
        for shard, path in enumerate(self.paths):
            members: dict[str, dict] = {}
            file = storage.path(path).open("rb")
            try:  # uncompressed only: offsets must be file offsets
                tar = tarfile.open(fileobj=file, mode="r:")
            except BaseException as e:
                file.close()
                if not isinstance(e, tarfile.ReadError):
                    raise
                raise ValueError(
                    f"{path}: not an uncompressed tar ({e}); compressed shards have no random access"
                ) from None
            with tar, file:
                for m in tar:
                    if not m.isreg():  # links, devices, directories: never followed
                        continue
                    base = m.name.rsplit("/", 1)
                    stem, _, ext = base[-1].partition(".")
                    key = f"{base[0]}/{stem}" if len(base) == 2 else stem
                    ext = "." + ext.lower()
                    field = "image" if ext in IMAGE_EXTENSIONS else ext[1:] if ext in (".txt", ".json") else None
                    if field:
                        members.setdefault(key, {})[field] = (m.offset_data, m.size)
            for key, found in members.items():
                if "image" not in found:
                    self.no_image += 1
                    continue
                keys.append(f"{Path(path).name}/{key}")
                spans.append([shard, *[v for f in self._FIELDS for v in found.get(f, (-1, -1))]])
        self.keys = keys
        self.spans = np.array(spans, np.int64).reshape(-1, 7)
        self._files = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_files"}

    def __setstate__(self, state):
        self.__dict__.update(state, _files={})

    def _read(self, shard: int, offset: int, size: int) -> bytes | None:
        if offset < 0:
            return None
        if shard not in self._files:
            self._files[shard] = storage.path(self.paths[shard]).open("rb")  # noqa: SIM115 (kept open, per process)
        f = self._files[shard]
        f.seek(offset)
        return f.read(size)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> RawRecord:
        shard, *rest = (int(v) for v in self.spans[i])
        image, txt, meta = (self._read(shard, rest[2 * k], rest[2 * k + 1]) for k in range(3))
        return _record(self.keys[i], image, txt, _read_json(meta))


def tar_shards(path: str | Path) -> list:
    """A folder of `*.tar`, a single tar, or a glob pattern -> the sorted shard list (local or in a bucket)."""
    path = storage.path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"), key=str)
    elif path.is_file():
        shards = [path]
    else:
        shards = sorted(path.parent.glob(path.name), key=str)
    if not shards:
        raise FileNotFoundError(f"no .tar shards at {path}")
    return shards


class TfdsSource:
    """A TFDS dataset read with `tfds.data_source`: `name` is a registered name ("coco_captions/2017")
    or a prepared dataset folder (`builder_from_directory`). Feature paths use '/' for nesting."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_feature: str, text_feature: str):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_feature, self.text_feature = image_feature.split("/"), text_feature.split("/")
        self._source = None
        self._len = len(self._open())

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state):
        self.__dict__.update(state, _source=None)

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            decoders = {}
            node = decoders
            for part in self.image_feature[:-1]:
                node = node.setdefault(part, {})
            node[self.image_feature[-1]] = tfds.decode.SkipDecoding()  # keep the encoded bytes
            if Path(self.name).is_dir():
                builder = tfds.builder_from_directory(self.name)
                self._source = builder.as_data_source(split=self.split, decoders=decoders)
            else:
                self._source = tfds.data_source(
                    self.name, split=self.split, data_dir=self.data_dir, decoders=decoders, download=False
                )
        return self._source

    def __len__(self) -> int:
        return self._len

    @staticmethod
    def _get(example: dict, path: list[str]):
        for part in path:
            if not isinstance(example, dict) or part not in example:
                raise KeyError(f"feature {'/'.join(path)!r} not in this TFDS example (has {sorted(example)})")
            example = example[part]
        return example

    def __getitem__(self, i: int) -> RawRecord:
        example = self._open()[i]
        image = self._get(example, self.image_feature)
        text = self._get(example, self.text_feature)
        meta = {k: v for k, v in example.items() if k in ("aesthetic_score", "aesthetic")}
        meta = {k: float(np.asarray(v)) for k, v in meta.items()}
        return _record(f"{self.split}/{i}", bytes(image), text if isinstance(text, (bytes, str)) else list(text), meta)


class PreparedSource:
    """Shards written by `prepare`: `index.json` + `index.npz` + `shard-*.array_record`."""

    def __init__(self, root: str | Path):
        from sdxl_jax.data.index import load_prepared_index

        self.root = storage.path(root)
        if storage.is_remote(self.root) and not str(self.root).startswith("gs://"):
            raise ValueError(f"{self.root}: ArrayRecord reads prepared shards from local disks and gs:// only")
        self.index = load_prepared_index(self.root)
        self.shard_paths = [str(self.root / name) for name in self.index.shards]
        self._source = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state):
        self.__dict__.update(state, _source=None)

    def __len__(self) -> int:
        return self.index.num_records

    def __getitem__(self, i: int) -> dict:
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.shard_paths)
        return decode_record(self._source[i])
