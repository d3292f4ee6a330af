"""Test-wide setup: 8 forced host devices for mesh tests, and absl flags marked parsed."""
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
