"""The GCS emulator the bucket tests run (`gcp-storage-emulator`, in memory, bucket `bucket`, loopback),
with two behaviours of real GCS added to media downloads:

- they carry `x-goog-generation`: TensorStore reads an object's generation from it (OCDBT's manifest
  updates are conditional on it) and fails with "Malformed StorageGeneration" without it;
- `Range: bytes=-N` (the last N bytes, how ArrayRecord's reader fetches a file's footer) is answered;
  the emulator knows only `bytes=A-[B]` and would send the whole object, which ArrayRecord then takes
  for the footer of any file over its 1 MiB prefetch ("Invalid Riegeli/records file").

    python -m tests.helpers.gcs_emulator PORT
"""

import re
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


_SUFFIX_RANGE = re.compile(r"^\s*bytes=-([0-9]+)\s*$")


def _download_with_generation(request, response, storage, *args, **kwargs):
    headers = request._request_handler.headers
    if match := _SUFFIX_RANGE.match(headers.get("range") or ""):
        try:
            size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"]))
        except Exception:  # noqa: BLE001  (a missing object: the original handler answers 404)
            size = None
        if size is not None:
            headers.replace_header("range", f"bytes={max(0, size - int(match.group(1)))}-")
    result = _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001  (a 404 the original handler has answered)
        return result
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
    return result


objects.download = _download_with_generation  # before the server module binds its route table

from gcp_storage_emulator.server import create_server  # noqa: E402

if __name__ == "__main__":
    sys.exit(create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket="bucket").run())
