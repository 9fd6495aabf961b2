"""Runs gcp-storage-emulator (a GCS server) on loopback for tests/test_paths.py.

python tests/support/gcs_emulator.py PORT BUCKET

Two gaps of the emulator are filled first:
- Real GCS sends an object's generation with its content (the x-goog-generation and
  x-goog-metageneration headers of a media download), and tensorstore, which orbax writes
  and reads arrays with, refuses a download without it ("Malformed StorageGeneration"). The
  emulator's download handler is wrapped to send the generation it already keeps for the
  object.
- Real GCS moves an object within a bucket in one call (`POST .../o/SRC/moveTo/o/DST`),
  which gcsfs tries first; the emulator answers 501, which gcsfs retries with backoff for
  about 30 s before it copies and deletes instead. The route is added here, as a copy and
  a delete on the server.
"""

from __future__ import annotations

import re
import sys
import time
from http import HTTPStatus

from gcp_storage_emulator import server as server_lib
from gcp_storage_emulator import settings
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


def _move(request, response, storage, *args, **kwargs):
    """POST /storage/v1/b/BUCKET/o/SRC/moveTo/o/DST: the object renamed within its bucket."""
    request.params["dest_bucket_name"] = request.params["bucket_name"]
    objects.copy(request, response, storage, *args, **kwargs)
    if response.status == HTTPStatus.OK:
        objects.delete(request, response, storage)


def _move_route(prefix: str) -> tuple[str, dict]:
    return (
        rf"^{re.escape(prefix)}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
        rf"(?P<dest_object_id>.*[^/]+)$",
        {"POST": _move},
    )


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    objects.download = _download_with_generation  # objects.get(alt=media) calls it by name
    for _, handlers in server_lib.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is _original_download:
                handlers[method] = _download_with_generation
    # Before the generic object routes, which would take ".../moveTo/o/DST" for an object name.
    server_lib.HANDLERS = (_move_route(settings.API_ENDPOINT), *server_lib.HANDLERS)
    server = server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    print(f"GCS emulator on 127.0.0.1:{port}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
