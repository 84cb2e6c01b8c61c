"""The byte format of one prepared record: a JSON header, then raw array and byte payloads.

    [u32 little-endian header length][header JSON][payload 0][payload 1]...

The header maps each field to either a JSON value (`{"json": v}`), a byte string (`{"bytes": n}`)
or an array (`{"dtype": "float16", "shape": [...], "nbytes": n}`); payloads follow in header order.
No pickle: a shard is data, never code, whoever wrote it. Version changes go in the index.
"""

import json
import struct

import numpy as np

_ALLOWED_DTYPES = {"uint8", "int32", "int64", "float16", "float32", "bool"}


def encode_record(fields: dict) -> bytes:
    """A dict of str -> JSON value | bytes | numpy array -> bytes."""
    header, payloads = {}, []
    for name, value in fields.items():
        if isinstance(value, (bytes, bytearray)):
            header[name] = {"bytes": len(value)}
            payloads.append(bytes(value))
        elif isinstance(value, np.ndarray):
            if value.dtype.name not in _ALLOWED_DTYPES:
                raise TypeError(f"field {name!r}: dtype {value.dtype} is not one of {sorted(_ALLOWED_DTYPES)}")
            data = np.ascontiguousarray(value).tobytes()
            header[name] = {"dtype": value.dtype.name, "shape": list(value.shape), "nbytes": len(data)}
            payloads.append(data)
        else:
            header[name] = {"json": value}
    head = json.dumps(header, ensure_ascii=False).encode()
    return struct.pack("<I", len(head)) + head + b"".join(payloads)


def decode_record(data: bytes) -> dict:
    """The inverse of `encode_record`; arrays come back read-only views of `data`."""
    if len(data) < 4:
        raise ValueError(f"record of {len(data)} bytes is too short")
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4 : 4 + n])
    out, pos = {}, 4 + n
    view = memoryview(data)
    for name, spec in header.items():
        if "json" in spec:
            out[name] = spec["json"]
        elif "bytes" in spec:
            out[name] = bytes(view[pos : pos + spec["bytes"]])
            pos += spec["bytes"]
        else:
            if spec["dtype"] not in _ALLOWED_DTYPES:
                raise ValueError(f"field {name!r}: dtype {spec['dtype']!r} is not allowed")
            out[name] = np.frombuffer(view[pos : pos + spec["nbytes"]], spec["dtype"]).reshape(spec["shape"])
            pos += spec["nbytes"]
    if pos != len(data):
        raise ValueError(f"record has {len(data) - pos} trailing bytes: corrupt or not a prepared record")
    return out
