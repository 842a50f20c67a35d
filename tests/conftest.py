"""Shared fixtures: one local Ray instance per test session, the real SmolLM2 tokenizer."""

from __future__ import annotations

import os

import pytest

# Ray 2.60 writes an auth token under ~/.ray unless told not to; tests need no auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray instance shared by every test that needs one (~3 s to start)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
