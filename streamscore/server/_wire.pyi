# Types of the compiled wire codec (_wire.c); see wire.py for its Python versions.
from streamscore.server.wire import PyScoreFields

# A struct sequence with PyScoreFields' fields, in its order.
ScoreFields = PyScoreFields

def decode_score_request(data: bytes, /) -> PyScoreFields | None: ...
def encode_score_response(
    request_id: str,
    score: float,
    decision: int,
    model: bytes,
    degraded: tuple[int, ...],
    features: dict[str, float] | None,
    queue_us: int,
    features_us: int,
    model_us: int,
    total_us: int,
    /,
) -> bytes: ...
