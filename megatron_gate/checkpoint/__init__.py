"""Checkpoints of gated GPTs: distributed save/load at any TP/PP layout, Hugging Face and paper
layout conversion, and the exact retrofit of gates into a non-gated checkpoint.

Modules: `safe_io` (atomic writes, weights-only loads), `model` (the `GptShape` a checkpoint holds),
`reshard` (torch_dist save/load), `hf_qwen3_next` and `paper_qwen3` (tensor maps), `convert`,
`retrofit`, and one `*_cli` module per console command.
"""
