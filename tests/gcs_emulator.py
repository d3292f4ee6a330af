"""gcp-storage-emulator (PyPI) with three behaviours of the real GCS JSON API that it lacks and
tensorstore relies on, so the gs:// tests exercise the same requests a real bucket serves:

  - media downloads carry the object's generation (`x-goog-generation`): tensorstore reads a
    zarr3 shard's index and then its chunks on the condition that the shard is unchanged,
    which needs the generation (without it: "Malformed StorageGeneration");
  - suffix byte ranges (`Range: bytes=-N`, the last N bytes): where a shard index lives;
  - object listings honour `startOffset`/`endOffset`: tensorstore deletes a key range (a token
    store replaced with --overwrite, `delete_existing`) by listing that range; ignoring it
    would list, and delete, the whole bucket.

    python tests/gcs_emulator.py --port=PORT --bucket=NAME    (in memory, on 127.0.0.1)

Started by the `gcs_emulator` fixture in tests/conftest.py.
"""
import argparse
import json
import re

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_SUFFIX_RANGE = re.compile(r"^\s*bytes=-(\d+)\s*$")


def download(request, response, storage, *args, **kwargs):
    """The emulator's download, plus suffix ranges and the generation header."""
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    suffix = _SUFFIX_RANGE.match(request.get_header("range", "") or "")
    if suffix:
        try:
            size = len(storage.get_file(bucket, name, show_error=False))
        except Exception:  # noqa: BLE001 - a missing object: the download answers 404 itself
            size = 0
        headers = request._request_handler.headers
        headers.replace_header("Range", f"bytes={max(0, size - int(suffix.group(1)))}-")
    objects.download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
        response["x-goog-generation"] = str(storage.get_file_obj(bucket, name)["generation"])


def get(request, response, storage, *args, **kwargs):
    """Object metadata, or (`alt=media`, how tensorstore reads) the download above."""
    if (request.query.get("alt") or [None])[0] == "media":
        return download(request, response, storage, *args, **kwargs)
    return objects.get(request, response, storage, *args, **kwargs)


def ls(request, response, storage, *args, **kwargs):
    """The emulator's listing, cut to [startOffset, endOffset) when those are given."""
    objects.ls(request, response, storage, *args, **kwargs)
    start = (request.query.get("startOffset") or [None])[0]
    end = (request.query.get("endOffset") or [None])[0]
    if (start or end) and response.status.value == 200:
        listing = json.loads(response._content)
        listing["items"] = [item for item in listing.get("items") or []
                            if (not start or item["name"] >= start) and (not end or item["name"] < end)]
        response.json(listing)


def _patch_handlers() -> None:
    replacements = {objects.download: download, objects.get: get, objects.ls: ls}
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            methods[method] = replacements.get(handler, handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True, help="created at start")
    args = parser.parse_args()
    _patch_handlers()
    server.create_server("127.0.0.1", args.port, in_memory=True, default_bucket=args.bucket).run()


if __name__ == "__main__":
    main()
