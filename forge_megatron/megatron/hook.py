"""`enable_forge(args, model_cfg)`: FORGE in Megatron's own training loop (megatron.training), the
one hook both forge-pretrain-gpt and a patched Megatron-LM pretrain_gpt.py (patches/) install.

Called after argument parsing and before `pretrain`; without --use-forge it does nothing. It
hooks Megatron's loop without copying it:

* the GPT model config gets FORGE's layer spec and a pre-wrap hook, which (after the model is
  built, before DDP) optionally covers the output layer and creates the ForgeController; covered
  weights do not require grad, so DDP and the (distributed) optimizer never see them;
* `get_megatron_optimizer`'s optimizer counts FORGE's gradients in its grad norm (so Megatron's
  clipping and logging use the global norm), skips its step when FORGE found non-finite
  gradients, reports its norm to FORGE (stale clipping, and the held two-pass updates) and
  carries FORGE state in its state dict, so --save/--load/--no-save-optim/--no-load-optim/
  --finetune treat it as optimizer state (weights loaded without it give FORGE's masters their
  values, as Megatron's reload_model_params does for its own);
* `get_optimizer_param_scheduler`'s scheduler drives FORGE's lr and weight decay;
* `get_forward_backward_func`'s function sets FORGE's clip coefficient and, with
  --forge-clip-grad-mode two-pass, runs the norms-only pass first.
Safe to call twice.
"""

from __future__ import annotations

import functools
import logging

import torch
from megatron.core import parallel_state
from megatron.core.utils import log_single_rank

from forge_megatron.megatron import checkpoint
from forge_megatron.megatron.args import add_forge_args, validate_forge_args
from forge_megatron.megatron.controller import ForgeController
from forge_megatron.megatron.spec import cover_output_layer, layer_spec_provider

logger = logging.getLogger(__name__)

__all__ = ["add_forge_args", "enable_forge", "controller"]

_STATE: dict = {}  # "args", "config" (ForgeConfig), "controller" (after the model is built)


def enable_forge(args, model_cfg) -> None:
    """Install FORGE for this run (after argument parsing, before `pretrain`)."""
    if not args.use_forge:
        return
    forge = validate_forge_args(args)
    _STATE.update(config=forge, args=args)
    model_cfg.transformer_layer_spec = layer_spec_provider(forge, args.forge_core_attention)
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


def controller() -> ForgeController | None:
    """This run's controller (None before the model is built or without --use-forge)."""
    return _STATE.get("controller")


def _pre_wrap_hook(model_chunks):
    """After the model is built, before DDP: cover the output layer, create the controller."""
    from megatron.training.training import get_megatron_optimizer_config

    args, forge = _STATE["args"], _STATE["config"]
    if args.forge_cover_output_layer:
        for chunk in model_chunks:
            cover_output_layer(chunk, forge)
    optimizer_config, overrides = get_megatron_optimizer_config(args)
    controller = ForgeController(
        model_chunks, optimizer_config, overrides, clip_grad=args.clip_grad, clip_mode=args.forge_clip_grad_mode,
        max_nonfinite_iterations=args.forge_max_nonfinite_iterations,
        model_parallel_group=parallel_state.get_model_parallel_group(),
        free_accumulation_buffers=args.forge_free_accumulation_buffers,
        data_parallel_group=parallel_state.get_data_parallel_group(), dp_accumulation=args.forge_dp_accumulation,
        dp_grad_dtype=args.forge_dp_grad_dtype, dp_overlap=args.overlap_grad_reduce)
    _STATE["controller"] = controller
    grad_bytes = 4 if (args.accumulate_allreduce_grads_in_fp32 or not args.bf16) else 2
    total = sum(p.numel() for chunk in model_chunks for p in chunk.parameters())
    log_single_rank(logger, logging.INFO,
                    f"FORGE: {len(controller.params)} weights, {controller.num_parameters():,} of {total:,} parameters "
                    f"on this rank, rule {controller.params[0].config.rule}, clipping {controller.clip_mode}; "
                    f"weight-gradient memory not allocated: {controller.num_parameters() * grad_bytes / 2**20:.2f} MiB")
    return model_chunks


def _wrap_optimizer_factory(factory):
    @functools.wraps(factory)
    def get_megatron_optimizer(*args, **kwargs):
        optimizer = factory(*args, **kwargs)
        attach_to_optimizer(optimizer, _STATE["controller"], _STATE["args"])
        return optimizer

    return get_megatron_optimizer


def attach_to_optimizer(optimizer, controller: ForgeController, args) -> None:
    """Make a Megatron optimizer count, gate, report and checkpoint FORGE's part of the model."""
    first = optimizer.chained_optimizers[0] if hasattr(optimizer, "chained_optimizers") else optimizer
    grads_for_norm = first.get_grads_for_grad_norm

    def get_grads_for_grad_norm(*a, **kw):
        # One extra "gradient" whose squared norm is this rank's FORGE sum of squares; Megatron
        # sums the squares of all grads and all-reduces over the model-parallel group.
        return [*grads_for_norm(*a, **kw), controller.local_sumsq().float().sqrt().reshape(1)]

    first.get_grads_for_grad_norm = get_grads_for_grad_norm
    # Megatron's distributed optimizer reduces grad-norm contributions over its data-parallel
    # ranks too, where FORGE's owners hold one block each; its other optimizers over the
    # model-parallel ranks only, where FORGE contributes the owners' sum.
    controller.optimizer_sums_over_data_parallel = (
        torch.distributed.get_world_size(first.get_grad_stats_parallel_group())
        > torch.distributed.get_world_size(parallel_state.get_model_parallel_group()))

    step = optimizer.step

    def step_with_forge(*a, **kw):
        iteration = args.curr_iteration + 1
        if not controller.step_decision(iteration):
            result = (False, float("nan"), None)  # Megatron counts it as a skipped iteration
        else:
            result = step(*a, **kw)
        stepped, grad_norm = (bool(result[0]), result[1]) if isinstance(result, tuple) else (True, None)
        controller.after_step(grad_norm, iteration, stepped=stepped)
        return result

    optimizer.step = step_with_forge

    sharded_state_dict = optimizer.sharded_state_dict

    def sharded_state_dict_with_forge(model_sharded_state_dict, is_loading: bool = False, **kw):
        state = sharded_state_dict(model_sharded_state_dict, is_loading, **kw)
        if not is_loading or checkpoint.checkpoint_has_forge_state(args):
            state["forge"] = checkpoint.sharded_state_dict(controller, model_sharded_state_dict, is_loading)
        else:
            logger.warning("FORGE: the checkpoint holds no FORGE state; FORGE state starts fresh")
        return state

    optimizer.sharded_state_dict = sharded_state_dict_with_forge

    state_dict = optimizer.state_dict

    def state_dict_with_forge():  # --ckpt-format torch
        return {**state_dict(), "forge": checkpoint.state_dict(controller)}

    optimizer.state_dict = state_dict_with_forge

    load_state_dict = optimizer.load_state_dict

    def load_state_dict_with_forge(loaded):  # after Megatron loaded the model's weights
        forge_state = loaded.pop("forge", None)
        if forge_state is not None:
            checkpoint.load_state_dict(controller, forge_state)
        else:
            if args.ckpt_format == "torch":
                logger.warning("FORGE: the checkpoint holds no FORGE state; FORGE state starts fresh")
            controller.reload_masters()
        return load_state_dict(loaded)

    optimizer.load_state_dict = load_state_dict_with_forge

    reload_model_params = optimizer.reload_model_params

    def reload_model_params_with_forge(*a, **kw):  # Megatron loaded the weights without optimizer state
        reload_model_params(*a, **kw)
        controller.reload_masters()

    optimizer.reload_model_params = reload_model_params_with_forge


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
            from megatron.core.rerun_state_machine import get_rerun_state_machine

            chunks = step_kwargs["model"] if isinstance(step_kwargs["model"], list) else [step_kwargs["model"]]

            def zero_grads():
                for chunk in chunks:
                    chunk.zero_grad_buffer()

            iteration = get_rerun_state_machine().current_iteration
            return _STATE["controller"].forward_backward(forward_backward, zero_grads, iteration, **step_kwargs)

        return forge_forward_backward

    return get_forward_backward_func
