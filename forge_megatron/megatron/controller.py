"""The per-step glue between FORGE's covered weights and Megatron's training loop: schedules,
gradient scale (clipping), the global grad norm, the non-finite policy, and the guard that FORGE
updates at most once per iteration.

Per iteration, in Megatron's train_step:
  forward_backward   `forward_backward(...)`: sets every covered weight's gradient scale (the
                     clip coefficient) and runs Megatron's schedule; with two-pass clipping at one
                     micro-batch and D = 1 a norms-only pass (nothing written) comes first, with
                     the data and RNG replayed; with exact clipping ('auto' or 'two-pass' at k > 1
                     or D > 1) the step's gradient is held until the optimizer step. The passes
                     run are logged as forge/forward-passes (1, or 2 with a replay).
  optimizer step     `step_decision()` before Megatron's optimizer steps: whether the iteration's
                     gradients were finite (else the step is skipped, see docs/megatron.md);
                     `after_step(grad_norm)` records Megatron's global norm (stale clipping's
                     next coefficient) and logs FORGE's scalars to Megatron's tensorboard writer.
  scheduler step     every covered weight gets the lr and weight decay Megatron's
                     OptimizerParamScheduler gives the parameter group Megatron would have put it in.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from forge_megatron.core.owner import Collectives
from forge_megatron.core.param import ForgeParam, GroupedForgeParam
from forge_megatron.core.running_clip import RunningClip
from forge_megatron.core.table import StepTable
from forge_megatron.core.update import step_tiles
from forge_megatron.megatron.args import CLIP_MODES, DP_ACCUMULATIONS, progressive_clipping_applies
from forge_megatron.megatron.errors import ConfigurationError

logger = logging.getLogger(__name__)


class ForgeController:
    def __init__(self, model_chunks: list[torch.nn.Module], optimizer_config, config_overrides=None,
                 clip_grad: float = 0.0, clip_mode: str = "auto", max_nonfinite_iterations: int = 3,
                 model_parallel_group=None, free_accumulation_buffers: bool = False, data_parallel_group=None,
                 dp_accumulation: str = "local", dp_grad_dtype: str | None = None, dp_overlap: bool = False,
                 per_token_loss: bool = False, pipeline_parallel: bool = False, expert_data_parallel_group=None):
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"unknown FORGE clip mode {clip_mode!r}; choose one of {CLIP_MODES}")
        if dp_accumulation not in DP_ACCUMULATIONS:
            raise ValueError(f"unknown data-parallel accumulation {dp_accumulation!r}; choose one of {DP_ACCUMULATIONS}")
        self.chunks = model_chunks
        self.named = covered_params(model_chunks)
        if not self.named:
            raise ValueError("no FORGE-covered weights in the model (forge_megatron.megatron.cover.cover_model covers "
                             "megatron-core's ColumnParallelLinear / RowParallelLinear)")
        self.params: list[ForgeParam] = [p._forge_param for _, p in self.named]
        self.global_names = [name for chunk in model_chunks for name in global_names(chunk)]
        # a grouped experts weight's (experts.py): each expert's global name on the per-expert path
        self.expert_names = [names for chunk in model_chunks for names in expert_names(chunk)]
        ids = []
        for name, experts, param in zip(self.global_names, self.expert_names, self.params):
            # the same on every rank and parallel layout, and for an expert on both experts' paths
            if experts is None:
                param.state.weight_id = weight_id(name)
                ids.append(param.state.weight_id)
            else:
                param.state.weight_ids = [weight_id(n) for n in experts]
                ids.extend(param.state.weight_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("two covered weights' names hash to one random-stream id")
        self.table: StepTable | None = None  # built at the first step, when the weights' dtypes are final
        # (a grouped weight is in the parameter group of its experts' weights, which Megatron built)
        self.groups = _megatron_param_groups(model_chunks, [getattr(p, "_forge_group_param", p) for _, p in self.named],
                                             optimizer_config, config_overrides)
        self.clip_grad = float(clip_grad)
        self.clip_mode = clip_mode if self.clip_grad > 0 else "off"
        self.max_nonfinite_iterations = max_nonfinite_iterations
        self.free_accumulation_buffers = free_accumulation_buffers
        self.group = model_parallel_group
        # Data parallelism: each rank owns a block of every covered weight's rows (core/owner.py),
        # over Megatron's data-parallel group, or an expert's over its expert-data-parallel group.
        # Megatron's DDP scales each rank's gradient by 1 / data-parallel size before summing it
        # (a per-token loss: by 1), experts' too; an expert alone in its expert-data-parallel group
        # has no reduction to scale in, so the factor multiplies its kernel's gradient scale.
        data_parallel_size = dist.get_world_size(data_parallel_group) if data_parallel_group is not None else 1
        self.dp_group = data_parallel_group if data_parallel_size > 1 else None
        self.collectives = Collectives(overlap=dp_overlap)  # one weight's reduce-scatter overlaps the next's backward
        factor = 1.0 if per_token_loss else 1.0 / data_parallel_size
        self.multipliers = []
        for (name, weight), param in zip(self.named, self.params):
            expert = not getattr(weight, "allreduce", True)  # Megatron's mark of an expert weight
            group = expert_data_parallel_group if expert else self.dp_group
            if group is None or dist.get_world_size(group) == 1:
                self.multipliers.append(factor if expert else 1.0)
                continue
            self.multipliers.append(1.0)
            try:
                param.own_rows(weight, group, owner_sums=dp_accumulation == "owner", grad_dtype=dp_grad_dtype,
                               collectives=self.collectives, scale=factor)
            except ValueError as error:
                raise ConfigurationError(f"--use-forge: covered weight {name}: {error}; choose a data-parallel "
                                         "size that divides every covered weight's rows") from None
        # How many ranks Megatron's optimizer sums its grad-norm contributions over (its plain
        # optimizer: the model-parallel group; its distributed optimizer: every rank).
        self.norm_group_size = 1
        self.grad_norm: float | None = None  # the last step's global norm (checkpointed: stale clipping)
        self.nonfinite = 0  # the last backward's non-finite gradient values in covered weights (all ranks)
        self.nonfinite_streak = 0  # consecutive iterations with non-finite values
        self.skip = False  # this iteration's updates are skipped (two-pass: nothing was written)
        self.grad_scale = 1.0  # the gradient scale of the last step's updates
        self._iteration = None  # the iteration whose backward FORGE last ran
        self.held = False  # the step's gradients are held, to be applied at the optimizer step
        self._held_coefficient: float | None = None  # a held step's clip coefficient (None: from its own norm)
        self.forward_passes = 0  # Megatron schedule passes in the last iteration (2: two-pass's replay)
        self._announced: str | None = None  # the resolved 'auto' clipping last logged
        # progressive clipping (one process, no per-token loss): the running estimate of the last
        # backward, and each weight's sum of squares of the previous step when a checkpoint gave them
        # (at one micro-batch: with several, 'auto' is exact and an explicit 'progressive' is refused)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.progressive_applies = progressive_clipping_applies(world_size, 1, per_token_loss)
        self.running_clip: RunningClip | None = None
        self._loaded_sumsqs: list[float] | None = None
        self._sumsqs_known = True  # the table's by-products hold a pass's sums (or none ran: zeros)
        # --calculate-per-token-loss: Megatron divides the step's gradients by its token count after
        # backward (finalize_model_grads); FORGE scales its own by the same `token_scale`.
        self.per_token_loss = per_token_loss
        self.pipeline_parallel = pipeline_parallel
        self.token_scale: torch.Tensor | None = None  # 1 / the step's token count (device), once known

    def num_parameters(self) -> int:
        return sum(p.numel() for _, p in self.named)

    def checkpoint_units(self) -> list[tuple[str, torch.Tensor, str, Any]]:
        """(name, weight, global name, param) of each weight as checkpoints hold it: a covered weight,
        or each expert of a grouped experts weight (its own weight Parameter, its per-expert global
        name and its part of the grouped state, GroupedForgeParam.expert), so that the keys are the
        per-expert path's."""
        units = []
        for (name, weight), global_name, experts, param in zip(self.named, self.global_names, self.expert_names,
                                                               self.params):
            if experts is None:
                units.append((name, weight, global_name, param))
                continue
            head, kind = name.rsplit(".", 2)[:2]
            for e, (expert_weight, expert_name) in enumerate(zip(weight._forge_expert_weights, experts)):
                units.append((f"{head}.local_experts.{e}.{kind}.weight", expert_weight, expert_name, param.expert(e)))
        return units

    # -- schedules --------------------------------------------------------------------------------

    def attach_scheduler(self, scheduler) -> None:
        """Follow Megatron's OptimizerParamScheduler: whenever it steps, each covered weight gets
        the lr and weight decay the scheduler gives its parameter group."""
        step = scheduler.step

        def step_and_follow(increment: int) -> None:
            step(increment)
            self.apply_schedule(scheduler)

        scheduler.step = step_and_follow
        load_state_dict = scheduler.load_state_dict

        def load_and_follow(state_dict) -> None:
            load_state_dict(state_dict)
            self.apply_schedule(scheduler)

        scheduler.load_state_dict = load_and_follow
        self.apply_schedule(scheduler)

    def apply_schedule(self, scheduler) -> None:
        for param, group in zip(self.params, self.groups):
            lr = scheduler.get_lr(group)
            wd = scheduler.get_wd(group) * group.get("wd_mult", 1.0)
            overrides = {k: group[k] for k in ("eps",) if k in group and k in param.state.hyperparameters}
            param.state.set_hyperparameters(lr=lr, weight_decay=wd, **overrides)

    # -- forward and backward ---------------------------------------------------------------------

    def forward_backward(self, forward_backward_func: Callable, zero_grads: Callable[[], None], iteration: int,
                         **kwargs):
        """Run Megatron's forward_backward_func for iteration `iteration` with FORGE's gradient scale.

        With k micro-batches (kwargs["num_microbatches"]) each covered weight accumulates its
        first k - 1 backward passes and updates at its k-th, the last of the step for that weight
        whatever the schedule (1F1B and interleaved pipelines run every forward of a stage before
        its last backward, whose dgrad uses the old weight).

        Held: where the step's gradient is held anyway (summed over several micro-batches, or
        reduce-scattered to the data-parallel owners' rows) and two-pass clipping wants this step's
        norm, or where --calculate-per-token-loss's token count is not known before the update,
        nothing is written in backward: Megatron's optimizer step computes the global norm (FORGE's
        sums of squares included) and `after_step` updates each weight from its held gradient with
        the clip coefficient and the token scale.
        Otherwise in backward: 'stale' and 'off' scale by the previous step's clip coefficient (or
        1); 'two-pass' runs a norms-only pass first (FORGE writes nothing; the other parameters'
        gradients are computed), computes the global norm, calls `zero_grads()` and replays the
        micro-batch and RNG state with the exact coefficient. A non-finite first pass skips the rest.
        With a per-token loss in backward (one micro-batch, no data or pipeline parallelism), the
        loss function's token count scales the update as soon as the loss is computed.
        """
        if iteration == self._iteration:
            raise RuntimeError(
                f"FORGE: iteration {iteration} ran its forward and backward a second time (Megatron's rerun state "
                "machine re-runs an iteration whose result failed validation, see the log above); FORGE has already "
                "applied this iteration's update and cannot undo it: rerun with --rerun-mode disabled")
        if self.held:
            raise RuntimeError("FORGE: the previous iteration's held update is still pending: its optimizer step did "
                               "not run (a held update is applied with Megatron's grad norm, in optimizer.step)")
        self._iteration = iteration
        self.skip = False
        self.token_scale = None
        micro_batches = int(kwargs.get("num_microbatches", 1))
        table = self._step_table()
        kwargs = self._counting_tokens(kwargs)
        self.forward_passes = 1
        mode = self._resolved_mode(micro_batches)
        if self._holds(micro_batches):
            self._held_coefficient = None if mode in ("two-pass", "exact") else self._stale_coefficient()
            self._begin(micro_batches, hold=True)
            table.write(1.0)
            self._set(apply=False)
            losses = forward_backward_func(**kwargs)
            self._check_backwards()
            self.held = True
            return losses
        if mode == "progressive" and not self._progressive_ready():
            mode = "two-pass"  # nothing to estimate from yet: this one step is exact (a norms-only pass first)
        self._begin(micro_batches)
        if mode != "two-pass":
            self.grad_scale = self._stale_coefficient()
            table.write(self.grad_scale)
            self._set(apply=True)
            self._start_running_clip(mode)
            try:
                losses = forward_backward_func(**kwargs)
            finally:
                for p in self.params:
                    p.running_clip = None
            self._end()
            return losses
        table.write(1.0)
        self._set(apply=False)
        rng, logged = _rng_states(), _logged_metrics()
        recorder = _Recorder(kwargs.get("data_iterator"))
        losses = forward_backward_func(**{**kwargs, "data_iterator": recorder.recording()})
        self._check_backwards()
        norm, nonfinite = self._global_norm_and_nonfinite(sumsq(counted_grads(self.chunks)))
        if nonfinite or not math.isfinite(norm):
            self.skip = True  # nothing written; step_decision() skips Megatron's step too
            self._end()
            return losses
        self.grad_scale = self._coefficient(norm)
        table.set_scale(self.grad_scale)
        zero_grads()
        _restore_rng_states(rng)
        _restore_logged_metrics(logged)
        self._begin(micro_batches)
        self._set(apply=True)
        self.forward_passes = 2
        losses = forward_backward_func(**{**kwargs, "data_iterator": recorder.replay()})
        self._end()
        return losses

    def _start_running_clip(self, mode: str) -> None:
        """Progressive clipping: each covered weight's update in this backward takes its coefficient
        from the running estimate of this step's norm (core/running_clip.py)."""
        self.running_clip = None
        if mode != "progressive":
            return
        table = self._step_table()
        previous = None
        if self._loaded_sumsqs is not None:
            previous = torch.tensor(self._loaded_sumsqs, dtype=torch.float64, device=table.stats.device)
            self._loaded_sumsqs = None
        running = RunningClip(table, self.clip_grad, self.grad_norm, self.grad_scale, previous=previous)
        for p in self.params:
            p.running_clip = running
        self.running_clip = running

    def _progressive_ready(self) -> bool:
        """Whether progressive clipping has the previous step's norm and each weight's sum of squares
        (not at the first step, nor after loading a checkpoint without them)."""
        return self.grad_norm is not None and (self._sumsqs_known or self._loaded_sumsqs is not None)

    def _holds(self, micro_batches: int) -> bool:
        """Whether this iteration's gradients are held until the optimizer step (forward_backward)."""
        count_known_in_backward = micro_batches == 1 and self.dp_group is None and not self.pipeline_parallel
        return ((self._resolved_mode(micro_batches) in ("two-pass", "exact") and self._gradient_held_anyway(micro_batches))
                or (self.per_token_loss and not count_known_in_backward))

    def _gradient_held_anyway(self, micro_batches: int) -> bool:
        """Whether the step's gradient exists whole before the update anyway: summed over several
        micro-batches (accumulation buffers) or reduce-scattered to the data-parallel owners' rows."""
        return micro_batches > 1 or self.dp_group is not None

    def _resolved_mode(self, micro_batches: int) -> str:
        """The clipping that runs this iteration: 'auto' is 'exact' (the held gradient applied at
        Megatron's optimizer step with Megatron's own coefficient: no replay, one element-wise pass)
        where the gradient is held anyway, else 'stale' (one micro-batch, no data parallelism: the
        update happens in backward, before this step's norm exists). Logged once on rank 0."""
        if self.clip_mode != "auto":
            return self.clip_mode
        held = self._gradient_held_anyway(micro_batches)
        mode = "exact" if held else "progressive" if self.progressive_applies else "stale"
        if self._announced != mode:
            self._announced = mode
            in_backward = ("one micro-batch and no data parallelism: the update runs in backward, before this step's "
                           "norm exists; ")
            why = (f"the step's gradient is held anyway ({micro_batches} micro-batch{'es' if micro_batches > 1 else ''}, data-parallel "
                   f"{'> 1' if self.dp_group is not None else '= 1'}): applied at the optimizer step with Megatron's "
                   "clip coefficient, no replay" if held else
                   in_backward + "each weight's coefficient counts the weights already updated with this step's sums "
                   "of squares and the rest with the previous step's (--forge-clip-grad-mode two-pass for exact "
                   "clipping at ~2x forward+backward)" if mode == "progressive" else
                   in_backward + "the previous step's norm is used (several processes or a per-token loss: the "
                   "progressive estimate needs one process's weights to be all of them; --forge-clip-grad-mode "
                   "two-pass for exact clipping at ~2x forward+backward)")
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"FORGE: clipping auto -> {mode}: {why}", flush=True)
        return mode

    def _stale_coefficient(self) -> float:
        return self._coefficient(self.grad_norm) if self.clip_mode in ("stale", "progressive", "auto") else 1.0

    def _counting_tokens(self, kwargs: dict) -> dict:
        """With a per-token loss: Megatron's schedule arguments with the loss function's token count
        scaling the update in backward (one micro-batch: its count is the step's), and
        `token_scale` taken from finalize_model_grads' global count (which scales the other
        parameters' gradients, and FORGE's norm and held updates). Nothing is read on the host."""
        if not self.per_token_loss:
            return kwargs
        from megatron.core.utils import get_model_config

        model_config = get_model_config(self.chunks[0])
        finalize = model_config.finalize_model_grads_func
        if not getattr(finalize, "_forge", False):
            def finalize_and_read_count(model, num_tokens, *args, **kw):
                result = finalize(model, num_tokens, *args, **kw)  # num_tokens becomes the global count
                if num_tokens is not None:
                    self.token_scale = 1.0 / torch.clamp(num_tokens, min=1)
                return result

            finalize_and_read_count._forge = True
            model_config.finalize_model_grads_func = finalize_and_read_count
        forward_step = kwargs["forward_step_func"]

        def forward_step_with_count(*args, **kw):
            output, loss_func = forward_step(*args, **kw)

            def loss_and_scale(*loss_args, **loss_kw):
                result = loss_func(*loss_args, **loss_kw)
                if len(result) == 3 and self.params[0].apply:  # (loss, token count, report): scale this update
                    self.table.set_scale(self.grad_scale / torch.clamp(result[1], min=1))
                return result

            return output, loss_and_scale

        return {**kwargs, "forward_step_func": forward_step_with_count}

    def _begin(self, micro_batches: int, hold: bool = False) -> None:
        for p in self.params:
            p.begin_iteration(micro_batches, hold=hold)

    def _check_backwards(self) -> None:
        """After a pass of Megatron's schedule: its data-parallel collectives have completed, and
        every covered weight ran one backward per micro-batch (else its update never came)."""
        self.collectives.wait()
        for (name, _), p in zip(self.named, self.params):
            if p.backwards != p.micro_batches:
                raise RuntimeError(f"FORGE: covered weight {name} ran {p.backwards} backward passes in an iteration of "
                                   f"{p.micro_batches} micro-batches; every covered weight must take part in every "
                                   "micro-batch's forward and backward")

    def _end(self) -> None:
        self._check_backwards()
        self._sumsqs_known = True  # the by-products now hold this pass's sums of squares
        if self.free_accumulation_buffers:
            for p in self.params:
                p.free_buffer()

    def _step_table(self) -> StepTable:
        """The covered weights' shared per-step memory (core/table.py), each weight bound to its slots."""
        if self.table is None:
            tiles = [step_tiles(p.rows(w), p.state, p.config.backend, p.config.tile_config)
                     for (_, w), p in zip(self.named, self.params)]
            self.table = StepTable([p.state for p in self.params], tiles, self.named[0][1].device)
            self.table.set_multipliers(self.multipliers)
            for param, slots in zip(self.params, self.table.slots):
                param.bind(slots)
        return self.table

    # -- optimizer step ---------------------------------------------------------------------------

    def step_decision(self, iteration: int) -> bool:
        """Called before Megatron's optimizer steps: True to step, False to skip the step.

        Non-finite gradient values in covered weights (summed over ranks) make the iteration a bad
        one: with two-pass clipping nothing has been written (the whole iteration is skipped); in
        the other modes the tiles holding them were left unchanged by the kernel while the other
        tiles were updated, and the rest of the model's step is skipped. Either way Megatron counts
        the iteration as skipped. After `max_nonfinite_iterations` bad iterations in a row training
        stops with an error.
        """
        if not self.skip:
            norm, self.nonfinite = self._global_norm_and_nonfinite(0.0)
            # a held gradient whose sum of squares overflows has no clip coefficient either
            self.skip = self.nonfinite > 0 or (self.held and not math.isfinite(norm))
        if not self.skip:
            self.nonfinite_streak = 0
            return True
        self.nonfinite_streak += 1
        what = ("no weight was updated (two-pass clipping found them before the update)" if self.clip_mode ==
                "two-pass" and not self.held else "no weight was updated (their gradients were held)" if self.held else "the tiles holding them were left unchanged, the other covered tiles were "
                "updated, and the other parameters' step was skipped")
        logger.warning("FORGE: iteration %d: %d non-finite gradient values in covered weights (or a non-finite sum "
                       "of their squares); %s (%d in a row)", iteration, self.nonfinite, what, self.nonfinite_streak)
        if self.nonfinite_streak >= self.max_nonfinite_iterations:
            raise RuntimeError(
                f"FORGE: {self.nonfinite_streak} consecutive iterations with non-finite gradients in covered weights "
                f"(last: iteration {iteration}); training stopped. Lower --lr or raise --clip-grad, or restart from "
                "the last checkpoint; --forge-max-nonfinite-iterations sets how many are tolerated")
        return False

    def after_step(self, grad_norm: float | None, iteration: int, stepped: bool = True) -> None:
        """After Megatron's optimizer step (`stepped`: it updated its parameters), whose global
        norm `grad_norm` was: apply the held updates, record the norm (stale clipping's next
        coefficient) and log FORGE's scalars."""
        if self.held:
            self._apply_held(grad_norm, stepped and not self.skip, iteration)
        if grad_norm is not None and not self.skip:
            self.grad_norm = float(grad_norm)
        # how far the coefficients the covered weights were scaled by are from this step's exact one
        # (mean relative error over the weights; 0 for exact clipping)
        coefficients = [self.grad_scale] if self.running_clip is None else self.running_clip.coefficients.tolist()
        if self.running_clip is not None:  # the one coefficient that shrank the covered gradient as much
            self.grad_scale = self.running_clip.effective_coefficient()
            self.running_clip = None
        exact = self._coefficient(grad_norm) if self.clip_mode != "off" else None
        clip_error = None if exact is None else sum(abs(c / exact - 1.0) for c in coefficients) / len(coefficients)
        from megatron.training.global_vars import get_tensorboard_writer

        writer = get_tensorboard_writer()
        if writer is not None:
            writer.add_scalar("forge/grad-scale", self.grad_scale, iteration)
            if clip_error is not None:
                writer.add_scalar("forge/clip-coefficient-error", clip_error, iteration)
            writer.add_scalar("forge/nonfinite", self.nonfinite, iteration)
            writer.add_scalar("forge/forward-passes", self.forward_passes, iteration)
            # covered weights (on this rank) whose backward saw no token: experts nothing was routed to
            writer.add_scalar("forge/empty-backwards", sum(p.empty_backwards for p in self.params), iteration)
            hyperparameters = self.params[0].state.hyperparameters
            writer.add_scalar("forge/learning-rate", hyperparameters["lr"], iteration)
            if "weight_decay" in hyperparameters:
                writer.add_scalar("forge/weight-decay", hyperparameters["weight_decay"], iteration)

    def _apply_held(self, grad_norm: float | None, stepped: bool, iteration: int) -> None:
        """Each weight's update from its held gradient, with the clip coefficient (two-pass: from
        Megatron's norm of this step, which Megatron clipped its own parameters with; else the one
        decided at forward time) and the token scale, unless Megatron's step did not run."""
        self.held = False
        exact = self._held_coefficient is None
        if not stepped or (exact and (grad_norm is None or not math.isfinite(grad_norm))):
            if not self.skip:
                logger.warning("FORGE: iteration %d: Megatron's optimizer step did not run or its grad norm is %s; "
                               "no covered weight was updated", iteration, grad_norm)
            for p in self.params:
                if p.owner is not None:
                    p.free_buffer()  # the owners' rows of a gradient that is not applied
            self._end()
            return
        missing = [name for (name, _), p in zip(self.named, self.params) if p.buffer is None or p.updates]
        if missing:  # checked before any weight is written (data-parallel ranks all-gather in step)
            raise RuntimeError(f"FORGE: no held gradient to apply for {missing[0]} (its update was applied already or "
                               "its backward did not run)")
        self.grad_scale = self._coefficient(grad_norm) if exact else self._held_coefficient
        self._step_table().set_scale(self.grad_scale if self.token_scale is None
                                     else self.grad_scale * self.token_scale)
        for (_, weight), param in zip(self.named, self.params):
            param.apply_accumulated(weight)
        self._end()

    # -- norms --------------------------------------------------------------------------------------

    def local_sumsq(self) -> torch.Tensor:
        """This rank's share of the covered weights' sum of squares, for Megatron's grad norm: the
        whole model's (`_forge_totals`) divided by the number of ranks Megatron's optimizer sums
        its norm over (`norm_group_size`), so that its sum is the whole model's once, whatever the
        layout (tensor, pipeline, data and expert parallel)."""
        return self._forge_totals()[0] / self.norm_group_size

    def _forge_totals(self) -> torch.Tensor:
        """[sum of squares, non-finite count] of the covered weights' (scaled) gradients in the
        last backward, over the whole model: every rank's own shards (with data parallelism the
        rows it owns) are distinct, so one all-reduce over all ranks sums each gradient once."""
        local = self._step_table().totals()
        local[0] = local[0] * self._token_scale_squared()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local)
        return local

    def _token_scale_squared(self) -> torch.Tensor | float:
        """What FORGE's raw sums of squares are multiplied by to be the scaled gradients' (a
        per-token loss divides the gradients by the step's token count)."""
        return 1.0 if self.token_scale is None else self.token_scale.double().square()

    def _global_norm_and_nonfinite(self, other_sumsq) -> tuple[float, int]:
        """The L2 norm of all of the step's gradients (FORGE's plus `other_sumsq`, the other
        parameters' local sum of squares, summed over the model-parallel group as Megatron's plain
        optimizer does) and FORGE's non-finite count."""
        totals = self._forge_totals()
        other = torch.as_tensor(other_sumsq, dtype=torch.float64, device=totals.device).reshape(1)
        if self.group is not None and dist.is_initialized():
            dist.all_reduce(other, group=self.group)
        return math.sqrt(float(totals[0] + other[0])), int(totals[1])

    def _coefficient(self, norm: float | None) -> float:
        if norm is None or not math.isfinite(norm):
            return 1.0
        return min(1.0, self.clip_grad / (norm + 1.0e-6))  # Megatron's clip_grad_by_total_norm_fp32

    def _set(self, apply: bool) -> None:
        for p in self.params:
            p.apply = apply

    # -- checkpoints --------------------------------------------------------------------------------

    def scalars(self) -> dict[str, Any]:
        """What FORGE's step depends on besides the state tensors (saved with them); with progressive
        clipping also each covered weight's sum of squares of the last step, by global name (the
        next step's estimate starts from them)."""
        out = {"grad_norm": self.grad_norm, "nonfinite_streak": self.nonfinite_streak}
        if self._uses_progressive() and (self._sumsqs_known or self._loaded_sumsqs is not None):
            sums = self._step_table().weight_sumsqs().tolist() if self._sumsqs_known else self._loaded_sumsqs
            out["weight_sumsqs"] = dict(zip(self.global_names, sums))
        return out

    def load_scalars(self, scalars: dict[str, Any]) -> None:
        self.grad_norm = scalars.get("grad_norm")
        self.nonfinite_streak = int(scalars.get("nonfinite_streak", 0))
        sums = scalars.get("weight_sumsqs") or {}
        known = self._uses_progressive() and all(name in sums for name in self.global_names)
        self._loaded_sumsqs = [float(sums[name]) for name in self.global_names] if known else None
        self._sumsqs_known = False  # the table's by-products are not the loaded step's

    def _uses_progressive(self) -> bool:
        return self.clip_mode == "progressive" or (self.clip_mode == "auto" and self.progressive_applies)

    def reload_masters(self) -> None:
        """Take every fp32 master (bf16 weights, master store) from its weight's rows: after weights
        were loaded without FORGE state (--finetune, --no-load-optim, an import, a standard run's
        checkpoint) the masters still hold the initialization the model was built with, and the
        first update would write it back over the loaded weights (Megatron's reload_model_params)."""
        with torch.no_grad():
            for (_, weight), param in zip(self.named, self.params):
                if param.state.master is not None:
                    param.state.master.copy_(param.rows(weight))


def global_names(chunk: torch.nn.Module) -> list[str]:
    """The names of a model chunk's covered weights (in covered_params' order) in the whole model:
    a transformer layer's local index (per pipeline stage and virtual chunk) replaced by its
    global one (Megatron's layer_number - 1), and a local expert's index by its global one (its
    expert-parallel rank's offset plus the local index), so a name is the same at every layout."""
    globalize = _globalizer(chunk)
    return [globalize(name) for name, _ in covered_params([chunk])]


def expert_names(chunk: torch.nn.Module) -> list[list[str] | None]:
    """Per covered weight of the chunk (covered_params' order): for a grouped experts weight
    ('<experts module>.linear_fc1.weight', experts.py) its experts' global names on the per-expert
    path ('<experts module>.local_experts.<global index>.linear_fc1.weight'); None for the others."""
    globalize = _globalizer(chunk)
    out = []
    for name, weight in covered_params([chunk]):
        param = weight._forge_param
        if not isinstance(param, GroupedForgeParam):
            out.append(None)
            continue
        head, kind = name.rsplit(".", 2)[:2]
        out.append([globalize(f"{head}.local_experts.{e}.{kind}.weight") for e in range(param.experts)])
    return out


def _globalizer(chunk: torch.nn.Module) -> Callable[[str], str]:
    renumber = {}  # module prefix + "." -> (the prefix of the index to replace, its global value)
    for prefix, module in chunk.named_modules():
        if type(module).__name__ == "TransformerLayer" and hasattr(module, "layer_number"):
            renumber[prefix + "."] = module.layer_number - 1
        elif type(module).__name__ in ("SequentialMLP", "ForgeGroupedMLP"):
            offset = module.ep_group.rank() * module.num_local_experts
            for index in range(module.num_local_experts):
                renumber[f"{prefix}.local_experts.{index}."] = offset + index

    def globalize(name: str) -> str:
        for prefix in sorted((p for p in renumber if name.startswith(p)), key=len, reverse=True):
            head, rest = prefix[:-1].rsplit(".", 1)[0], name[len(prefix):]
            name = f"{head}.{renumber[prefix]}.{rest}"
        return name

    return globalize


def weight_id(global_name: str) -> int:
    """A covered weight's id for its random streams: a 32-bit hash of its global name, the same at
    every tensor-, pipeline- and data-parallel layout (the controller checks that a rank's ids are
    distinct)."""
    return zlib.crc32(global_name.encode())


def covered_params(model_chunks: Iterable[torch.nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every FORGE-covered weight, in module order, then each chunk's grouped
    experts weights ('<experts module>.linear_fc1.weight', stacked [E, out, in]; experts.py)."""
    out = []
    for chunk in model_chunks:
        out += [(name, p) for name, p in chunk.named_parameters() if getattr(p, "_forge_param", None) is not None]
        out += [(f"{prefix}.{kind}.weight", module.stacked(kind)) for prefix, module in chunk.named_modules()
                if hasattr(module, "forge_params") for kind in module.forge_params()]
    return out


class _Recorder:
    """Wraps Megatron's data iterator(s) (one, a list per model chunk, or None) so that the micro-
    batches drawn in the first pass can be drawn again, identically, in the second. Megatron's
    RerunDataIterator has `__next__` only, so items are drawn with next()."""

    def __init__(self, data_iterator):
        self.source = data_iterator
        self.seen: list[list] = []

    def recording(self):
        if self.source is None:
            return None
        sources = self.source if isinstance(self.source, list) else [self.source]
        self.seen = [[] for _ in sources]
        wrapped = [_Recording(it, seen) for it, seen in zip(sources, self.seen)]
        return wrapped if isinstance(self.source, list) else wrapped[0]

    def replay(self):
        if self.source is None:
            return None
        replays = [iter(seen) for seen in self.seen]
        return replays if isinstance(self.source, list) else replays[0]


class _Recording:
    def __init__(self, iterator, seen: list):
        self.iterator, self.seen = iterator, seen

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        self.seen.append(item)
        return item


def _megatron_param_groups(model_chunks, weights, optimizer_config, config_overrides) -> list[dict]:
    """The parameter group Megatron's optimizer would put each covered weight in (wd_mult, max_lr,
    min_lr, decoupled lr, ...), from Megatron's own `_get_param_groups` run with the covered
    weights visible."""
    from megatron.core.optimizer import _get_param_groups

    uncovered = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
    for p in uncovered:
        p.requires_grad_(False)
    for p in weights:
        p.requires_grad_(True)
    try:
        groups = _get_param_groups(model_chunks, optimizer_config, config_overrides)
    finally:
        for p in weights:
            p.requires_grad_(False)
        for p in uncovered:
            p.requires_grad_(True)
    group_of = {id(p): {k: v for k, v in g.items() if k != "params"} for g in groups for p in g["params"]}
    return [group_of[id(w)] for w in weights]


def counted_grads(model_chunks) -> list[torch.Tensor]:
    """Gradients of the non-covered parameters that count once in the global norm (Megatron's rule:
    no tensor-parallel duplicates, no shared copies)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    out = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            if not p.requires_grad or not param_is_not_shared(p) or not param_is_not_tensor_parallel_duplicate(p):
                continue
            grad = getattr(p, "main_grad", None)
            grad = grad if grad is not None else p.grad
            if grad is not None:
                out.append(grad)
    return out


def sumsq(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of `tensors` in fp32 (0-dim)."""
    total = torch.zeros((), dtype=torch.float32)
    for t in tensors:
        total = total.to(t.device) + t.float().square().sum()
    return total


def _rng_states() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(states["cpu"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def _logged_metrics() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Megatron's per-iteration logging accumulators that every forward adds to (multi-token
    prediction losses, MoE auxiliary losses and metrics), each with a copy of its values: a
    replayed forward must not count twice in the log."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tensors = [v for v in MTPLossLoggingHelper.tracker.values() if isinstance(v, torch.Tensor)]
    tensors += [entry.values for entry in get_moe_metrics_tracker().metrics.values()]
    return [(t, t.clone()) for t in tensors]


def _restore_logged_metrics(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The accumulators as `_logged_metrics` found them; those the first pass created are zeroed."""
    before = {id(t): copy for t, copy in saved}
    for t, _ in _logged_metrics():
        t.copy_(before[id(t)]) if id(t) in before else t.zero_()
