"""Numeric hot paths (window tiles). Imports nothing else of streamscore."""
