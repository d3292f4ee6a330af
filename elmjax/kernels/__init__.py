"""Attention kernels: a plain-JAX reference and a Pallas flash-attention kernel."""
