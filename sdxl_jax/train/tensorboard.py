"""A minimal TensorBoard event-file writer (scalars and PNG images), with no TensorFlow.

An event file is a sequence of TFRecords (`uint64 length, masked crc32c(length), data, masked
crc32c(data)`), each holding one serialised `tensorflow.Event` protobuf. Only the handful of fields
needed are encoded, by hand:

    Event         1: wall_time (double)  2: step (int64)  3: file_version (string)  5: summary
    Summary       1: value (repeated)
    Summary.Value 1: tag (string)  2: simple_value (float)  4: image
    Summary.Image 1: height  2: width  3: colorspace (int32)  4: encoded_image_string (PNG bytes)

`read_events` decodes what this module writes (tests, and `python -m sdxl_jax.train.tensorboard FILE`).
"""

import io
import socket
import struct
import sys
import time

import numpy as np
from PIL import Image

from sdxl_jax import storage


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 2:  # length-delimited
        return key + _varint(len(payload)) + payload
    return key + payload


def _event(step: int, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    out = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if summary is not None:
        out += _field(5, 2, summary)
    return out


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class EventWriter:
    """Appends events to `events.out.tfevents.<time>.<host>` in `logdir` (a local folder or a bucket
    prefix: there the file is uploaded whole at each `flush`, see `storage.AppendFile`)."""

    def __init__(self, logdir):
        logdir = storage.path(logdir)
        storage.make_dirs(logdir)
        self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._file = storage.AppendFile(self.path)
        self._file.write(_record(_event(0, file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(
            _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in values.items()
        )
        self._file.write(_record(_event(step, summary)))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: uint8 `[H, W, 3]`."""
        h, w, c = image.shape
        img = _field(1, 0, _varint(h)) + _field(2, 0, _varint(w)) + _field(3, 0, _varint(c)) + _field(4, 2, png(image))
        self._file.write(_record(_event(step, _field(1, 2, _field(1, 2, tag.encode()) + _field(4, 2, img)))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ---- reading back ---------------------------------------------------------------------------------


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[i]
        result |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return result, i


def _fields(buf: bytes):
    """(number, wire type, value) of each field of a serialised message."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def read_events(path) -> list[dict]:
    """Every event of a file as {"step", "wall_time", "scalars": {tag: v}, "images": {tag: (h, w, png)}};
    checks both CRCs of every record."""
    data, i, events = storage.path(path).read_bytes(), 0, []
    while i < len(data):
        header = data[i : i + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[i + 8 : i + 12])[0] != masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        body = data[i + 12 : i + 12 + length]
        if struct.unpack("<I", data[i + 12 + length : i + 16 + length])[0] != masked_crc(body):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        i += 16 + length
        event = {"step": 0, "scalars": {}, "images": {}}
        for number, _, value in _fields(body):
            if number == 1:
                event["wall_time"] = struct.unpack("<d", value)[0]
            elif number == 2:
                event["step"] = value
            elif number == 5:
                for _, _, v in _fields(value):
                    parts = {n: x for n, _, x in _fields(v)}
                    tag = parts[1].decode()
                    if 2 in parts:
                        event["scalars"][tag] = struct.unpack("<f", parts[2])[0]
                    if 4 in parts:
                        img = {n: x for n, _, x in _fields(parts[4])}
                        event["images"][tag] = (img[1], img[2], img[4])
        events.append(event)
    return events


if __name__ == "__main__":
    for e in read_events(sys.argv[1]):
        print(e["step"], e["scalars"], {k: v[:2] for k, v in e["images"].items()})
