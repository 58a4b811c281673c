"""Load generators and benchmarks (run as ``python -m loadtest.<name>``)."""
