"""The sibling module of the test script (as `gpt_builders.py` is for Megatron-LM's script)."""

from pretrain_gpt_min import forward_step, train_valid_test_datasets_provider

__all__ = ["forward_step", "train_valid_test_datasets_provider"]
