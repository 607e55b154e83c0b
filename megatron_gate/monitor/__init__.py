"""Stability monitor: collectors -> one reduction -> detectors -> actions -> sinks."""
