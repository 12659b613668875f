"""--use-forge for Megatron-LM's own pretrain_gpt.py (release core_v0.19.0); see patches/.

The patch adds FORGE's flags to the argument parser and calls `enable_forge(args, model_cfg)`
before `pretrain`. That hooks FORGE into Megatron-LM's training loop without copying it:

* the GPT model config gets FORGE's layer spec and a pre-wrap hook, which (after the model is
  built, before DDP) optionally covers the output layer and creates the ForgeController; covered
  weights do not require grad, so DDP and the (distributed) optimizer never see them;
* `get_megatron_optimizer`'s optimizer counts FORGE's gradients in its grad norm (so Megatron's
  clipping and logging use the global norm), reports that norm back to FORGE (stale clipping) and
  carries FORGE state in its (sharded) state dict, so --save/--load/--no-save-optim/--no-load-optim/
  --finetune treat it as optimizer state;
* `get_optimizer_param_scheduler`'s scheduler drives FORGE's lr and weight decay;
* `get_forward_backward_func`'s function sets FORGE's clip coefficient and, with
  --forge-clip-grad-mode two-pass, runs the norms-only pass first.
Safe to call twice; does nothing without --use-forge.
"""

from __future__ import annotations

import functools
import logging
import os

from forge_megatron.param import ForgeConfig
from forge_megatron.spec import cover_output_layer, get_gpt_layer_forge_spec
from forge_megatron.training import CHECKPOINT_PREFIX, ForgeController, add_forge_args, validate_forge_args

logger = logging.getLogger(__name__)

__all__ = ["add_forge_args", "enable_forge"]

_STATE: dict = {}  # "config": ForgeConfig, "controller": ForgeController (after the model is built)


def enable_forge(args, model_cfg) -> None:
    """Install FORGE for this Megatron-LM run (after argument parsing, before `pretrain`)."""
    if not args.use_forge:
        return
    forge = validate_forge_args(args)
    _STATE.update(config=forge, args=args)
    model_cfg.transformer_layer_spec = functools.partial(_layer_spec, forge, args.forge_core_attention)
    if _pre_wrap_hook not in model_cfg.pre_wrap_hooks:
        model_cfg.pre_wrap_hooks.append(_pre_wrap_hook)
    from megatron.training import training

    for name, wrap in (("get_megatron_optimizer", _wrap_optimizer_factory),
                       ("get_optimizer_param_scheduler", _wrap_scheduler_factory),
                       ("get_forward_backward_func", _wrap_forward_backward_factory)):
        factory = getattr(training, name)
        if not getattr(factory, "_forge", False):
            wrapped = wrap(factory)
            wrapped._forge = True
            setattr(training, name, wrapped)


def _layer_spec(forge: ForgeConfig, core_attention: str, model_config, vp_stage=None):
    return get_gpt_layer_forge_spec(forge, core_attention, normalization=model_config.transformer.normalization,
                                    qk_layernorm=model_config.transformer.qk_layernorm)


def _pre_wrap_hook(model_chunks):
    """After the model is built, before DDP: cover the output layer, create the controller."""
    from megatron.core import parallel_state
    from megatron.training.training import get_megatron_optimizer_config

    args, forge = _STATE["args"], _STATE["config"]
    if args.forge_cover_output_layer:
        for chunk in model_chunks:
            cover_output_layer(chunk, forge)
    optimizer_config, overrides = get_megatron_optimizer_config(args)
    _STATE["controller"] = ForgeController(model_chunks, optimizer_config, overrides, clip_grad=args.clip_grad,
                                           clip_mode=args.forge_clip_grad_mode,
                                           model_parallel_group=parallel_state.get_model_parallel_group())
    return model_chunks


def _wrap_optimizer_factory(factory):
    @functools.wraps(factory)
    def get_megatron_optimizer(*args, **kwargs):
        optimizer = factory(*args, **kwargs)
        attach_to_optimizer(optimizer, _STATE["controller"])
        return optimizer

    return get_megatron_optimizer


def attach_to_optimizer(optimizer, controller: ForgeController) -> None:
    """Make a Megatron optimizer count, report and checkpoint FORGE's part of the model."""
    first = optimizer.chained_optimizers[0] if hasattr(optimizer, "chained_optimizers") else optimizer
    grads_for_norm = first.get_grads_for_grad_norm

    def get_grads_for_grad_norm(*args, **kwargs):
        # One extra "gradient" whose squared norm is this rank's FORGE sum of squares; Megatron
        # sums the squares of all grads and all-reduces over the model-parallel group.
        return [*grads_for_norm(*args, **kwargs), controller.local_sumsq().sqrt().reshape(1)]

    first.get_grads_for_grad_norm = get_grads_for_grad_norm

    step = optimizer.step

    def step_and_report(*args, **kwargs):
        result = step(*args, **kwargs)
        if isinstance(result, tuple) and result[1] is not None:
            controller.grad_norm = float(result[1])  # the global norm: stale clipping's next coefficient
        return result

    optimizer.step = step_and_report

    sharded_state_dict = optimizer.sharded_state_dict

    def sharded_state_dict_with_forge(model_sharded_state_dict, is_loading: bool = False, **kwargs):
        state = sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)
        if not is_loading or _checkpoint_has_forge_state():
            state["forge"] = controller.sharded_state_dict(model_sharded_state_dict)
        else:
            logger.info("FORGE: the checkpoint holds no FORGE state; FORGE state starts fresh")
        return state

    optimizer.sharded_state_dict = sharded_state_dict_with_forge

    load_state_dict = optimizer.load_state_dict

    def load_state_dict_with_forge(state_dict):
        forge_state = state_dict.pop("forge", None)
        if forge_state is not None:
            controller.load_sharded_state_dict(forge_state)
        return load_state_dict(state_dict)

    optimizer.load_state_dict = load_state_dict_with_forge


def _checkpoint_has_forge_state() -> bool:
    """Whether the checkpoint Megatron-LM is about to load (--load, latest iteration) has FORGE keys."""
    from megatron.core import dist_checkpointing

    args = _STATE["args"]
    tracker = os.path.join(args.load, "latest_checkpointed_iteration.txt")
    if not os.path.exists(tracker):
        return False
    with open(tracker) as f:
        name = f.read().strip()
    path = os.path.join(args.load, "release" if name == "release" else f"iter_{int(name):07d}")
    return any(k.startswith(CHECKPOINT_PREFIX) for k in dist_checkpointing.load_tensors_metadata(path))


def _wrap_scheduler_factory(factory):
    @functools.wraps(factory)
    def get_optimizer_param_scheduler(optimizer):
        scheduler = factory(optimizer)
        _STATE["controller"].attach_scheduler(scheduler)
        return scheduler

    return get_optimizer_param_scheduler


def _wrap_forward_backward_factory(factory):
    @functools.wraps(factory)
    def get_forward_backward_func(*args, **kwargs):
        forward_backward = factory(*args, **kwargs)

        def forge_forward_backward(**step_kwargs):
            if step_kwargs.get("forward_only"):
                return forward_backward(**step_kwargs)
            chunks = step_kwargs["model"] if isinstance(step_kwargs["model"], list) else [step_kwargs["model"]]

            def zero_grads():
                for chunk in chunks:
                    chunk.zero_grad_buffer()

            return _STATE["controller"].forward_backward(forward_backward, zero_grads, **step_kwargs)

        return forge_forward_backward

    return get_forward_backward_func
