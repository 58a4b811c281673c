"""Event logs on disk: read payment events from JSONL or Parquet, write feature rows.

Used by the offline backfill. Invalid events are skipped and counted by reason,
exactly as the stream worker would dead-letter them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from streamscore.stream.events import InvalidEvent, PaymentEvent, event_from_dict, parse_event


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


UTF8_BOM = b"\xef\xbb\xbf"


def read_events(path: Path, rejected: Counter[str]) -> Iterator[PaymentEvent]:
    """Valid events of a JSONL or Parquet log; ``rejected`` counts the rest by reason."""
    if _is_parquet(path):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                try:
                    yield event_from_dict(row)
                except InvalidEvent as error:
                    rejected[error.reason] += 1
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle):
            if number == 0 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM) :]  # written by some Windows tools: not JSON
            if not line.strip():
                continue
            try:
                yield parse_event(line)
            except InvalidEvent as error:
                rejected[error.reason] += 1


def write_rows(path: Path, columns: tuple[str, ...], rows: Iterable[dict[str, Any]]) -> int:
    """Write rows with these columns as JSONL, or Parquet when the name ends in .parquet."""
    count = 0
    if _is_parquet(path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                pa.field(name, pa.string() if name == "event_id" else pa.float64())
                for name in columns
            ]
        )
        with pq.ParquetWriter(path, schema) as writer:
            chunk: list[dict[str, Any]] = []
            for row in rows:
                chunk.append(row)
                if len(chunk) == 10_000:
                    writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=schema))
                    count += len(chunk)
                    chunk = []
            if chunk:
                writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=schema))
                count += len(chunk)
        return count
    with path.open("wb") as handle:
        for row in rows:
            handle.write(orjson.dumps({name: row[name] for name in columns}) + b"\n")
            count += 1
    return count
