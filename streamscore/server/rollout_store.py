"""The rollout's state in a file: shared by the server processes of a host, kept across
restarts.

``<model repository>/<model>/rollout.json`` holds the rollout (primary, canary and its
percent, shadows, generation) and its latest rollbacks, as JSON. Every process reads
it every ``RolloutManager.poll_s`` and adopts a newer generation; a change (an Admin
call, an automatic rollback) is made under an exclusive lock on
``rollout.json.lock`` (flock), after reading the file again, so two processes never
both write the same next generation. The file is replaced whole (a rename), so a
reader never sees half of one. Without it (``serve --workers N``) an Admin call
changed only the process its connection reached, and a restart forgot promotes and
rollbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

FILE_NAME = "rollout.json"
LOCK_POLL_S = 0.01


class RolloutFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    def read(self) -> dict[str, Any] | None:
        """The stored rollout, or None when there is none yet. ValueError when the
        file is not a rollout."""
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except orjson.JSONDecodeError as error:
            raise ValueError(f"{self.path.name} is not JSON: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("generation"), int):
            raise ValueError(f"{self.path.name} holds no rollout")
        return data

    def write(self, data: dict[str, Any]) -> None:
        """Replace the file whole: written aside, then renamed over it."""
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staging.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        os.replace(staging, self.path)

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Held by one process at a time (an flock, polled: the loop never blocks)."""
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
