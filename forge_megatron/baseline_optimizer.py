"""The optimizer forge-pretrain-gpt uses for the parameters FORGE does not cover (and for every
parameter in a standard run): what Megatron's optimizer does, on any device.

megatron-core's optimizers hard-code CUDA, so this is torch.optim (AdamW or SGD) with Megatron's
parameter groups (`_get_param_groups` with the standard overrides: no weight decay for biases and
1-D parameters, decoupled lr for embedding/output), fp32 master copies of bf16 parameters fed from
DDP's main_grad buffers (as Float16OptimizerWithFloat16Params), Megatron's grad-norm accounting
(tensor-parallel duplicates counted once, summed over the model-parallel group) and clipping, and
a sharded state dict built with megatron-core's dist_checkpointing helpers.
"""

from __future__ import annotations

import functools

import torch

from forge_megatron.training import counted_grads, sumsq


class BaselineOptimizer:
    """`master_weights=False` updates bf16 parameters in place (no fp32 copy); `optimizer_class`
    (with extra `optimizer_kwargs`) replaces torch.optim's AdamW/SGD, e.g. by a memory-lean peer
    such as torchao's AdamW8bit (used by scripts/convergence_study.py)."""

    CHECKPOINT_PREFIX = "optimizer.state."  # the keys optim_state_to_sharding_state gives

    def __init__(self, model_chunks, optimizer_config, config_overrides, master_weights: bool = True,
                 optimizer_class=None, optimizer_kwargs: dict | None = None):
        from megatron.core.optimizer import _get_param_groups

        groups = _get_param_groups(model_chunks, optimizer_config, config_overrides)
        self.chunks = model_chunks
        self.model_params: list[torch.nn.Parameter] = []
        self.main_params: list[torch.Tensor] = []
        torch_groups = []
        for group in groups:
            mains = []
            for p in group["params"]:
                main = p.detach().float().clone() if p.dtype != torch.float32 and master_weights else p
                if main is not p:
                    main.requires_grad_(True)
                self.model_params.append(p)
                self.main_params.append(main)
                mains.append(main)
            torch_groups.append({**group, "params": mains})
        cfg = optimizer_config
        if cfg.optimizer == "adam":  # fused, as Megatron's FusedAdam: in place, no temporaries (CPU too)
            cls = optimizer_class or functools.partial(torch.optim.AdamW, fused=True)
            hp = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            cls = optimizer_class or functools.partial(torch.optim.SGD, foreach=False)
            hp = dict(lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        else:
            raise ValueError(f"--optimizer {cfg.optimizer} is not supported by forge-pretrain-gpt (adam, sgd)")
        self.optimizer = cls(torch_groups, **hp, **(optimizer_kwargs or {}))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def local_grad_sumsq(self) -> torch.Tensor:
        """This rank's share of the squared global grad norm (Megatron's counting rule)."""
        return sumsq(counted_grads(self.chunks))

    def step(self, clip_coefficient: float = 1.0) -> None:
        """Load main grads, clip, step, and copy fp32 masters back into bf16 parameters."""
        for p, main in zip(self.model_params, self.main_params):
            grad = getattr(p, "main_grad", None)
            grad = grad if grad is not None else p.grad
            if grad is not None:
                grad = grad.float() * clip_coefficient if clip_coefficient < 1.0 else grad.float()
            main.grad = None if grad is None else grad.to(main.dtype)
        self.optimizer.step()
        with torch.no_grad():
            for p, main in zip(self.model_params, self.main_params):
                if main is not p:
                    p.copy_(main)

    def zero_grad(self) -> None:
        for p, main in zip(self.model_params, self.main_params):
            p.grad = None
            main.grad = None

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            make_sharded_optimizer_tensor,
            optim_state_to_sharding_state,
        )

        if is_loading:
            self._init_state()
        state = self.optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, iter(self.model_params))
        steps = {int(s["step"]) for s in state["state"].values() if "step" in s}
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        state["state"]["common_step"] = max(steps) if steps else 0
        masters = {i: make_sharded_optimizer_tensor(id_map[i], main, "optimizer.master")
                   for i, (p, main) in enumerate(zip(self.model_params, self.main_params)) if main is not p}
        return {"torch": state, "master": masters}

    def load_sharded_state_dict(self, loaded: dict) -> None:
        state = loaded["torch"]
        step = state["state"].pop("common_step")
        for param_state in state["state"].values():
            if "step" not in param_state:
                param_state["step"] = torch.tensor(float(step))
        self.optimizer.load_state_dict(state)
        with torch.no_grad():
            for i, tensor in loaded["master"].items():
                self.main_params[i].copy_(tensor)
                self.model_params[i].copy_(tensor)

    def _init_state(self) -> None:
        """Create zero state tensors, so that a checkpoint has somewhere to load into."""
        for group in self.optimizer.param_groups:
            for main in group["params"]:
                state = self.optimizer.state[main]
                if state:
                    continue
                if isinstance(self.optimizer, torch.optim.AdamW):
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(main),
                                 exp_avg_sq=torch.zeros_like(main))
                elif group["momentum"]:
                    state["momentum_buffer"] = torch.zeros_like(main)
