"""Shared fixtures."""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from streamscore.stream.broker import EmbeddedBroker


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    """A CLI test's ``setup_logging`` binds the root logger to that test's captured
    stderr, which pytest closes after it: later tests' threads then print "Logging
    error ... I/O operation on closed file" into the CI log. Its handlers go with it."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):  # (removeHandler edits root.handlers)
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def trained_model_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamscore.training import train

    repository = tmp_path_factory.mktemp("models")
    train(repository, duration_s=600, rate_per_s=10, epochs=100)
    return repository


@pytest.fixture
def trained_model(trained_model_once: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with a small demo model trained for the tests (a few seconds,
    once), copied for each test: a server keeps its rollout in the repository
    (``rollout.json``), which must not carry over from one test to the next."""
    repository = tmp_path_factory.mktemp("models") / "repository"
    shutil.copytree(trained_model_once, repository)
    return repository


# -- embedded Kafka broker (tansu) ---------------------------------------------------------


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def broker() -> AsyncIterator[EmbeddedBroker]:
    """One real tansu broker for the whole session (in-memory; use unique topic and
    group names per test). ``broker.bootstrap`` is ``"127.0.0.1:PORT"``."""
    async with EmbeddedBroker() as running:
        yield running
