"""`enable_forge(args, model_cfg)`: FORGE in Megatron's own training loop (megatron.training), the
one hook both forge-pretrain-gpt and a patched Megatron-LM pretrain_gpt.py (patches/) install.

Called after argument parsing and before `pretrain`; without --use-forge it does nothing. It
hooks Megatron's loop without copying it:

* the GPT model config gets a pre-wrap hook, which (after Megatron has built the model, whatever
  spec built it, and before DDP) turns every megatron-core parallel linear FORGE can own into its
  FORGE class (cover.py) and creates the ForgeController; covered weights do not require grad, so
  DDP and the (distributed) optimizer never see them;
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

import torch
from megatron.core import parallel_state
from megatron.training.utils import print_rank_0

from forge_megatron.megatron import checkpoint
from forge_megatron.megatron.args import add_forge_args, output_layer_config, validate_forge_args
from forge_megatron.megatron.controller import ForgeController
from forge_megatron.megatron.cover import cover_model
from forge_megatron.megatron.errors import ConfigurationError
from forge_megatron.megatron.muon import lay_out_matrices

__all__ = ["add_forge_args", "enable_forge", "controller"]

_STATE: dict = {}  # "args", "config" (ForgeConfig), "controller" (after the model is built)


def enable_forge(args, model_cfg) -> None:
    """Install FORGE for this run (after argument parsing, before `pretrain`)."""
    forge = validate_forge_args(args)  # also refuses FORGE flags given without --use-forge
    if forge is None:
        _install_standard_checkpoint_check(args)
        return
    _STATE.update(config=forge, args=args)
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


def _install_standard_checkpoint_check(args) -> None:
    """A standard run that loads optimizer state checks it is not FORGE state it cannot read."""
    if not args.load or args.no_load_optim or args.finetune:
        return
    from megatron.training import training

    factory = training.get_megatron_optimizer
    if getattr(factory, "_forge", False):
        return

    @functools.wraps(factory)
    def get_megatron_optimizer(*a, **kw):
        optimizer = factory(*a, **kw)
        _refuse_unreadable_forge_checkpoints(optimizer, args)
        return optimizer

    get_megatron_optimizer._forge = True
    training.get_megatron_optimizer = get_megatron_optimizer


def controller() -> ForgeController | None:
    """This run's controller (None before the model is built or without --use-forge)."""
    return _STATE.get("controller")


def _pre_wrap_hook(model_chunks):
    """After the model is built, before DDP: cover its linears, create the controller."""
    from megatron.training.training import get_megatron_optimizer_config

    args, forge = _STATE["args"], _STATE["config"]
    report = cover_model(model_chunks, forge, multi_token_prediction=bool(args.mtp_num_layers),
                         grouped_experts=bool(getattr(args, "moe_grouped_gemm", False)),
                         output=output_layer_config(args))
    if forge.rule == "muon":
        lay_out_matrices(model_chunks, args)
    optimizer_config, overrides = get_megatron_optimizer_config(args)
    controller = ForgeController(
        model_chunks, optimizer_config, overrides, clip_grad=args.clip_grad, clip_mode=args.forge_clip_grad_mode,
        max_nonfinite_iterations=args.forge_max_nonfinite_iterations,
        model_parallel_group=parallel_state.get_model_parallel_group(),
        free_accumulation_buffers=args.forge_free_accumulation_buffers,
        data_parallel_group=parallel_state.get_data_parallel_group(), dp_accumulation=args.forge_dp_accumulation,
        dp_grad_dtype=args.forge_dp_grad_dtype, dp_overlap=args.overlap_grad_reduce,
        per_token_loss=args.calculate_per_token_loss, pipeline_parallel=args.pipeline_model_parallel_size > 1,
        expert_data_parallel_group=parallel_state.get_expert_data_parallel_group() if args.num_experts else None)
    _STATE["controller"] = controller
    grad_bytes = 4 if (args.accumulate_allreduce_grads_in_fp32 or not args.bf16) else 2
    total = sum(p.numel() for chunk in model_chunks for p in chunk.parameters())
    print_rank_0(f"FORGE: rule {forge.rule}, clipping {controller.clip_mode}; {report.covered_summary()}: "
                 f"{controller.num_parameters():,} of {total:,} parameters on this rank, weight-gradient memory not "
                 f"allocated: {controller.num_parameters() * grad_bytes / 2**20:.2f} MiB{report.standard_summary()}")
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

    def get_grads_for_grad_norm(grad_norm_group=None):
        # One extra "gradient" whose squared norm is this rank's share of FORGE's sum of squares;
        # Megatron sums the squares of all grads over its optimizer's grad-stats group. FORGE's
        # weights count in the main norm only (not in a separate group's, e.g. MTP's).
        grads = grads_for_norm(grad_norm_group)
        return grads if grad_norm_group is not None else [*grads, controller.local_sumsq().float().sqrt().reshape(1)]

    first.get_grads_for_grad_norm = get_grads_for_grad_norm
    controller.norm_group_size = torch.distributed.get_world_size(first.get_grad_stats_parallel_group())

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
    master_name = checkpoint.megatron_master_name(args)

    def sharded_state_dict_with_forge(model_sharded_state_dict, is_loading: bool = False, **kw):
        from_standard = is_loading and not checkpoint.checkpoint_has_forge_state(args)
        if from_standard:
            checkpoint.standard_checkpoint_is_readable(args)
        state = sharded_state_dict(model_sharded_state_dict, is_loading, **kw)
        state["forge"] = checkpoint.sharded_state_dict(controller, model_sharded_state_dict, master_name, is_loading,
                                                       from_standard)
        return state

    optimizer.sharded_state_dict = sharded_state_dict_with_forge

    state_dict = optimizer.state_dict

    def state_dict_with_forge():  # --ckpt-format torch
        return {**state_dict(), "forge": checkpoint.state_dict(controller)}

    optimizer.state_dict = state_dict_with_forge

    load_state_dict = optimizer.load_state_dict

    def load_state_dict_with_forge(loaded):  # after Megatron loaded the model's weights
        forge_state = loaded.pop("forge", None)
        if forge_state is None:  # --ckpt-format torch, a standard run's
            raise ConfigurationError("the checkpoint (--ckpt-format torch) is standard Megatron's; FORGE reads a "
                                     "standard optimizer state from torch_dist checkpoints only: "
                                     f"{checkpoint.SWITCH_FIX}")
        checkpoint.load_state_dict(controller, forge_state)
        result = load_state_dict(loaded)
        if checkpoint.SCALARS not in forge_state:  # a standard checkpoint's moments: Megatron's step count
            checkpoint.adopt_megatron_step(controller, optimizer)
        return result

    optimizer.load_state_dict = load_state_dict_with_forge

    reload_model_params = optimizer.reload_model_params

    def reload_model_params_with_forge(*a, **kw):  # Megatron loaded the weights without optimizer state
        reload_model_params(*a, **kw)
        controller.reload_masters()

    optimizer.reload_model_params = reload_model_params_with_forge


def _refuse_unreadable_forge_checkpoints(optimizer, args) -> None:
    """A standard run (no --use-forge) that loads a FORGE checkpoint's optimizer state: refused in
    one line where Megatron's optimizer cannot read FORGE's part of it."""
    sharded_state_dict = optimizer.sharded_state_dict

    def checked(model_sharded_state_dict, is_loading: bool = False, **kw):
        if is_loading and checkpoint.checkpoint_has_forge_state(args):
            checkpoint.forge_checkpoint_is_readable_by_megatron(args)
        return sharded_state_dict(model_sharded_state_dict, is_loading, **kw)

    optimizer.sharded_state_dict = checked
    load_state_dict = optimizer.load_state_dict

    def load_checked(loaded):
        if "forge" in loaded and args.ckpt_format == "torch":
            raise ConfigurationError("the checkpoint (--ckpt-format torch) holds FORGE optimizer state, which a "
                                     f"standard run reads from torch_dist checkpoints only; {checkpoint.SWITCH_FIX}")
        loaded.pop("forge", None)  # torch_dist: FORGE's scalars; its moments were read under Megatron's keys
        return load_state_dict(loaded)

    optimizer.load_state_dict = load_checked


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
