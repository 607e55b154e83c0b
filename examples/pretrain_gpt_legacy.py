"""The same minimal GPT pre-training as `pretrain_gpt_min.py`, written for the older Megatron-LM
API (before 0.18): a `model_provider` builds the model and `pretrain` parses the arguments,
`pretrain(datasets_provider, model_provider, ModelType, forward_step, args_defaults=...)`.

`python -m megatron_gate.run` runs it on an older Megatron-LM as is, and on Megatron-LM 0.19's
training loop through a bridge (see `megatron_gate/megatron_lm/pretrain_api.py`).
"""

from __future__ import annotations

from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import import_module
from megatron.training import get_args, pretrain
from megatron.training.arguments import core_transformer_config_from_args
from pretrain_gpt_min import forward_step, train_valid_test_datasets_provider


def layer_spec(args):
    """`--spec MODULE NAME` when given, else Megatron's TE or local GPT layer spec."""
    if args.spec is not None:
        return import_module(args.spec)
    if args.transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)
    return get_gpt_layer_local_spec(
        qk_layernorm=args.qk_layernorm, normalization=args.normalization
    )


def model_provider(pre_process=True, post_process=True, vp_stage=None):
    """Build this pipeline stage's GPT model from the parsed arguments."""
    args = get_args()
    return GPTModel(
        config=core_transformer_config_from_args(args),
        transformer_layer_spec=layer_spec(args),
        vocab_size=args.padded_vocab_size or args.vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        vp_stage=vp_stage,
    )


if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True
    pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={"tokenizer_type": "NullTokenizer"},
    )
