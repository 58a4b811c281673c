"""streamscore: real-time fraud scoring with streaming features."""

__version__ = "0.1.0"
