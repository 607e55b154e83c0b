"""The two `pretrain` APIs of Megatron-LM, and a bridge from the older one to the newer one.

- Megatron-LM 0.19 (the megatron-core 0.19 wheel): the script parses the arguments itself and
  passes a config container, `pretrain(cfg, datasets_provider, model_type, forward_step)`.
- Older Megatron-LM: `pretrain(datasets_provider, model_provider, model_type, forward_step,
  extra_args_provider=..., args_defaults=...)`, and `pretrain` parses the arguments.

Both parse through `megatron.training.arguments.parse_args`, where megatron-gate adds its flags,
so the older API needs nothing more on an older Megatron-LM. `bridge_legacy_call` runs an older
script on the 0.19 training loop (parse, build the container, pass its `model_provider`).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Keyword arguments of the older `pretrain` that the 0.19 one accepts as well.
_SHARED_KEYWORDS = (
    "process_non_loss_data_func",
    "get_embedding_ranks",
    "get_position_embedding_ranks",
    "non_loss_data_func",
    "store",
    "inprocess_call_wrapper",
)
_LEGACY_POSITIONAL = (
    "train_valid_test_dataset_provider",
    "model_provider",
    "model_type",
    "forward_step_func",
    "process_non_loss_data_func",
    "extra_args_provider",
    "args_defaults",
)


def takes_config_container(pretrain: Callable[..., Any]) -> bool:
    """True for the 0.19 `pretrain(cfg_container, ...)`."""
    target = inspect.unwrap(pretrain)
    first = next(iter(inspect.signature(target).parameters), None)
    return first == "cfg_container"


def is_legacy_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True when a script calls `pretrain` the older way (a datasets provider comes first)."""
    first = args[0] if args else kwargs.get("train_valid_test_dataset_provider")
    return callable(first)  # a config container is a dataclass instance, not a function


def _model_provider_for(provider: Callable[..., Any]) -> Callable[..., Any]:
    """Call an older `model_provider(pre_process, post_process[, vp_stage])` from 0.19's
    `get_model`, which also passes `config=` and `pg_collection=`."""
    parameters = inspect.signature(provider).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return provider

    def model_provider(**kwargs: Any) -> Any:
        return provider(**{key: value for key, value in kwargs.items() if key in parameters})

    return model_provider


def bridge_legacy_call(
    pretrain: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run an older-API `pretrain(...)` call on the 0.19 `pretrain(cfg_container, ...)`."""
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    call = dict(zip(_LEGACY_POSITIONAL, args, strict=False)) | kwargs
    parsed = parse_and_validate_args(
        extra_args_provider=call.get("extra_args_provider"),
        args_defaults=call.get("args_defaults") or {},
    )
    with warnings.catch_warnings():
        # It recommends a model config; an older script brings a model_provider instead.
        warnings.simplefilter("ignore")
        container = pretrain_cfg_container_from_args(parsed, None)
    logger.info("megatron-gate: running an older-API pretrain_gpt.py on Megatron-LM 0.19's loop.")
    return pretrain(
        container,
        call["train_valid_test_dataset_provider"],
        call["model_type"],
        call["forward_step_func"],
        model_provider=_model_provider_for(call["model_provider"]),
        **{key: call[key] for key in _SHARED_KEYWORDS if call.get(key) is not None},
    )
