"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with a small demo model trained for the tests (a few seconds)."""
    from streamscore.training import train

    repository = tmp_path_factory.mktemp("models")
    train(repository, duration_s=600, rate_per_s=10, epochs=100)
    return repository
