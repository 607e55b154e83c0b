"""A minimal HybridModel pre-training entry point for Megatron-LM 0.19 (the config-container API).

The megatron-core 0.19.2 wheel ships the hybrid model builder (`megatron.training.models.hybrid`)
but no hybrid training script (Megatron-LM's own lives at the top of its repository): this one
builds a `HybridModelConfig` from the arguments (`--hybrid-layer-pattern "*-*-"`, ...) and calls
`pretrain`. Data and loss are those of `pretrain_gpt_min.py`. It does not import megatron-gate:

    python -m megatron_gate.run examples/pretrain_hybrid_min.py ... --hybrid-layer-pattern "*-*-" \\
        --gated-attention headwise [--spec megatron_gate.hybrid_spec local]   # local: no TE (CPU)
"""

from __future__ import annotations

from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.argument_utils import (
    hybrid_config_from_args,
    pretrain_cfg_container_from_args,
)
from megatron.training.arguments import parse_and_validate_args
from pretrain_gpt_min import forward_step, train_valid_test_datasets_provider

if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    config = pretrain_cfg_container_from_args(args, hybrid_config_from_args(args))
    pretrain(config, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)
