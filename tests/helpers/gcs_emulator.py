"""The GCS emulator the bucket tests run (`gcp-storage-emulator`, in memory, bucket `bucket`, loopback),
with one header added: media downloads carry `x-goog-generation`, as real GCS sends them. TensorStore
reads an object's generation from it (OCDBT's manifest updates are conditional on it) and fails with
"Malformed StorageGeneration" without it.

    python -m tests.helpers.gcs_emulator PORT
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
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
