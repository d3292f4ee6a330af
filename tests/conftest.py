"""Test-wide setup: 8 forced host devices for mesh tests, absl flags marked parsed, and a local
GCS emulator for the gs:// tests."""
import os

# Must happen before jax initialises its CPU backend; single-device tests use device 0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Tests run on the CPU; with libtpu installed (the TPU compile tests) JAX would otherwise try
# to open a TPU and take libtpu's lock. Compiling for abstract TPU devices works regardless.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def elmjax_cache(tmp_path_factory):
    """One tokenizer cache for the whole session, never the user's ~/.cache/elmjax: the
    embedded tokenizer trains once (about 2 s) and tests stay independent of the machine."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ELMJAX_CACHE", str(tmp_path_factory.getbasetemp() / "elmjax_cache"))
    yield
    patch.undo()


class GcsEmulator:
    """A running gcp-storage-emulator: `env` points gcsfs, google-cloud-storage and tensorstore
    at it (and keeps them from looking for cloud credentials elsewhere); `url(name)` is a fresh
    gs:// prefix in its bucket."""

    bucket = "elmjax-test"

    def __init__(self, port: int):
        endpoint = f"http://127.0.0.1:{port}"
        unreachable = "127.0.0.1:9"  # the discard port: refused at once, never a network call
        self.env = {
            "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs and google-cloud-storage (tensorboardX)
            "TENSORSTORE_GCS_HTTP_URL": endpoint,  # tensorstore (orbax's arrays, token stores)
            # gcsfs would otherwise ask Google's Storage Control API (gRPC) about each bucket.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "NO_GCE_CHECK": "true",  # gcsfs: no metadata-server credentials
            "GCE_METADATA_HOST": unreachable,  # google-auth's metadata server
            "GCE_METADATA_IP": unreachable,
            "GCE_METADATA_ROOT": unreachable,  # tensorstore's
        }
        self._count = 0

    def url(self, name: str) -> str:
        self._count += 1
        return f"gs://{self.bucket}/{name}-{os.getpid()}-{self._count}"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A local GCS (PyPI gcp-storage-emulator, in memory, see tests/gcs_emulator.py) on
    127.0.0.1 for the whole session; its environment is set in this process too, so
    in-process code reaches it as well."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    emulator = GcsEmulator(port)
    # Its request log goes to a file: a pipe nobody reads would fill and stall the server.
    log = tmp_path_factory.mktemp("gcs_emulator") / "log.txt"
    log_file = open(log, "wb")
    process = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), f"--port={port}",
         f"--bucket={emulator.bucket}"],
        stdout=subprocess.DEVNULL, stderr=log_file,
    )
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/{emulator.bucket}", timeout=1)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"gcp-storage-emulator did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    patch = pytest.MonkeyPatch()
    for name, value in emulator.env.items():
        patch.setenv(name, value)
    yield emulator
    patch.undo()
    process.terminate()
    process.wait(timeout=10)
    log_file.close()
