"""Structured logging: one JSON object per line on stderr (or plain text for humans)."""

from __future__ import annotations

import atexit
import contextvars
import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable

import orjson

# The request being served by the current task: (request_id, card_id). Every log line
# written while serving it carries the request id and a hash of the card id, never
# the card id itself. Set per request by the scoring service (a ContextVar: each gRPC
# call runs in its own task, so concurrent requests never see each other's).
CURRENT_REQUEST: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "streamscore_request", default=None
)


# The key of ``hash_id``. A card number has few unknown digits (the BIN and the last
# four are printed on receipts), so an unkeyed hash of it is reversed by trying them
# all: keyed, it cannot be without the key. Random per process until
# ``set_hash_key`` (the ``card_hash_key`` setting) gives a shared one.
_HASH_KEY = os.urandom(32)
_HASH_KEY_SHARED = False


def set_hash_key(secret: str) -> None:
    """Key ``hash_id`` with ``secret`` (any length); "" keeps the per-process key."""
    global _HASH_KEY, _HASH_KEY_SHARED
    if secret:
        _HASH_KEY = hashlib.blake2b(secret.encode(), digest_size=32, person=b"ss-key").digest()
        _HASH_KEY_SHARED = True


def hash_key_shared() -> bool:
    """Whether ``hash_id`` values match across processes and restarts (a key was set)."""
    return _HASH_KEY_SHARED


def hash_id(value: str) -> str:
    """A stable stand-in for an identifier (card, device, ip) in logs and in the
    decision log: the same value in both, so a log line and a decision about the same
    card can be matched without either holding the card number. A keyed BLAKE2b:
    without the key it cannot be reversed by trying every card number."""
    return hashlib.blake2b(
        value.encode(), digest_size=8, key=_HASH_KEY, person=b"ss-card"
    ).hexdigest()


# Attributes every LogRecord has; anything else came in through ``extra=`` and is logged.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def clipped(text: str, limit: int = 64) -> str:
    """``text``, or its first ``limit`` characters and its length when longer: an id
    as a caller sent it may be of any length (refused past 256 characters), and
    echoed whole it made a status too large for gRPC's metadata (16 KiB)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


# Set by ``serve --workers`` in each worker's environment: its index.
WORKER_INDEX_VARIABLE = "STREAMSCORE_WORKER_INDEX"

# Fields on every line of this process: ``worker`` (its index) in a ``serve --workers``
# set, whose workers' lines are merged into one stream.
PROCESS_FIELDS: dict[str, object] = {}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """A line's fields beyond the message: the process's, the request being served,
    then the extras."""
    fields: dict[str, object] = dict(PROCESS_FIELDS)
    request = CURRENT_REQUEST.get()
    if request is not None:
        fields["request_id"] = clipped(request[0])
        if request[1]:  # (none: a request that did not parse, or left it out)
            fields["card_hash"] = hash_id(request[1])
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # Non-string keys (a dict of batch size -> time) become strings, as json does;
        # without the option orjson refuses them and the whole line is lost.
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class TextFormatter(logging.Formatter):
    """One line for a reader: time, level, logger, message, then the extra fields as
    ``key=value`` (without them a line said "grpc server listening", not where)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Control characters escaped: a caller's request id (or text quoted in a
        # message) with a newline or a terminal escape would forge or hide lines.
        line = super().formatMessage(record).translate(_CONTROL_ESCAPES)
        fields = [
            f"{key}={_text_value(value)}"
            for key, value in _fields(record).items()
            if value is not None
        ]
        return f"{line} {' '.join(fields)}" if fields else line


_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}


def _text_value(value: object) -> str:
    """Bare when it reads unambiguously, else a JSON string (quoted, escaped)."""
    text = str(value)
    if text and all(c.isprintable() and not c.isspace() and c not in '"=' for c in text):
        return text
    return orjson.dumps(text).decode()


class RepeatLimiter(logging.Filter):
    """At most one record a ``period_s`` per (logger, message template) of the libraries
    that repeat themselves: aiokafka logs each failed reconnect, metadata update and
    fetch, about every 100 ms per client, so a broker outage wrote some 50 error lines
    a second per process and buried ours. The next one let through says how many were
    held back; at exit (``flush``) the last one held back is written, saying how many
    others were, so a flood's count is never lost with its last line."""

    def __init__(
        self,
        # Ours too: refused Admin calls (a token being guessed), dead-lettered events
        # (a producer sending bad ones: each is in the DLQ and counted), ScoreStreams
        # refused past max_streams (a client leaking them) and a fallback model failing
        # every call (each counted as a failed or degraded answer) could come as fast.
        prefixes: tuple[str, ...] = (
            "aiokafka",
            "kafka",
            "streamscore.auth",
            "streamscore.dead_letters",
            "streamscore.fallbacks",
            "streamscore.streams",
        ),
        period_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.prefixes = prefixes
        self.period_s = period_s
        self.clock = clock
        # (when one was let through, how many held back since, the last held back)
        self._last: dict[tuple[str, str, object], tuple[float, int, logging.LogRecord | None]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # On the handler: a logger's own filters do not see its children's records.
        if not record.name.startswith(self.prefixes):
            return True  # ours, and other libraries': whole
        # Per reason too, where a record gives one (a dead letter's): a flood of one
        # kind of bad event must not hide the first of another.
        key = (record.name, str(record.msg), getattr(record, "reason", None))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.period_s:
            self._last[key] = (last[0], last[1] + 1, record)
            return False
        if last is not None and last[1]:
            record.repeats_held_back = last[1]
        if len(self._last) > 1024:  # templates are few; bound it anyway
            self._last.clear()
        self._last[key] = (now, 0, None)
        return True

    def flush(self, handler: logging.Handler) -> None:
        """Write through ``handler`` the last record held back of each kind, with how
        many others were held back before it (at exit: nothing follows to say it)."""
        held = [(n, record) for _, n, record in self._last.values() if record is not None]
        self._last.clear()
        if getattr(getattr(handler, "stream", None), "closed", False):
            return  # its stream closed before the exit (a test's captured stderr)
        for n, record in held:
            if n > 1:
                record.repeats_held_back = n - 1
            handler.handle(record)


class AnswerNobodyWaitedFor(logging.Filter):
    """gRPC's "ExecuteBatchError raised in core by servicer method", at error with a
    traceback: a call whose answer was sent as its deadline ran out (its caller had
    gone), which is the caller's business (counted in ``rpc_seconds_count{code}``),
    not an error of the server's. Passed at debug, without the traceback."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX)):
            return True
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return True


# gRPC's asyncio server logs through this logger.
GRPC_AIO_LOGGER = "grpc._cython.cygrpc"


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    worker = os.environ.get(WORKER_INDEX_VARIABLE)
    if worker is not None:
        PROCESS_FIELDS["worker"] = int(worker) if worker.isdigit() else worker
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter at INFO drowns ours.
    for noisy in ("aiokafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    limiter = RepeatLimiter()
    handler.addFilter(limiter)
    grpc_log = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, AnswerNobodyWaitedFor) for f in grpc_log.filters):
        grpc_log.addFilter(AnswerNobodyWaitedFor())
    global _flush_at_exit
    if _flush_at_exit is None:  # once per process: a later setup replaces the pair
        atexit.register(flush_held_back)
    _flush_at_exit = functools.partial(limiter.flush, handler)


def flush_held_back() -> None:
    """Write the lines the limiter holds back (at exit; and before the line a command
    stops with, which must stay the last)."""
    if _flush_at_exit is not None:
        _flush_at_exit()


# The current handler's RepeatLimiter.flush, called at exit (before logging's own
# shutdown, registered earlier, closes the handlers).
_flush_at_exit: Callable[[], None] | None = None
