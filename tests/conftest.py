"""Test-wide setup: 8 forced host devices for mesh tests, and absl flags marked parsed."""
import os

# Must happen before jax initialises its CPU backend; single-device tests use device 0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()
