"""Runs gcp-storage-emulator (a GCS server) on loopback for tests/test_paths.py.

python tests/support/gcs_emulator.py PORT BUCKET

One gap of the emulator is filled first: real GCS sends an object's generation with its
content (the x-goog-generation and x-goog-metageneration headers of a media download),
and tensorstore, which orbax writes and reads arrays with, refuses a download without it
("Malformed StorageGeneration"). The emulator's download handler is wrapped to send the
generation it already keeps for the object.
"""

from __future__ import annotations

import sys
import time

from gcp_storage_emulator import server as server_lib
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        obj = None
    if obj is not None:
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return _original_download(request, response, storage, *args, **kwargs)


_original_download = objects.download


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    objects.download = _download_with_generation  # objects.get(alt=media) calls it by name
    for _, handlers in server_lib.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is _original_download:
                handlers[method] = _download_with_generation
    server = server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    print(f"GCS emulator on 127.0.0.1:{port}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
