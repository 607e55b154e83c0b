"""`megatron-gate demo` and `megatron-gate sweep`: baseline vs gated GPTs under aggressive learning rates.

data (token streams) -> trainer (Megatron-Core GPT runs, monitor on) -> report (tables, HTML).
"""
