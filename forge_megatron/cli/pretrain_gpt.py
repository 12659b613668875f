"""forge-pretrain-gpt: pretrain a GPT with megatron-core, with or without --use-forge.

Accepts Megatron-LM pretrain_gpt.py's flags (it uses Megatron's own argument parser and
validation) for what it supports: GPTModel with the local layer spec, tensor and sequence
parallelism, data-parallel and pipeline size 1, --mock-data or the embedded byte-level corpus
(--forge-corpus stdlib), adam/sgd, Megatron's lr/wd schedules, --clip-grad, --bf16, torch_dist
checkpoints (--save/--load/--no-save-optim/--no-load-optim/--finetune). Runs on CPU (gloo; under
torchrun for TP=2) and on GPUs (nccl). For data-parallel training and indexed datasets use
Megatron-LM's pretrain_gpt.py with the patch in patches/.

The training step is Megatron's: megatron-core DDP and forward_backward_func with
finalize_model_grads, then the optimizer step and OptimizerParamScheduler.step. With --use-forge
the covered weights are updated inside the backward pass (ForgeController), everything else by
BaselineOptimizer, which does what Megatron's optimizer does (megatron-core's optimizers need CUDA).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist

from forge_megatron.baseline_optimizer import BaselineOptimizer
from forge_megatron.benchmarking import read_and_reset_peak
from forge_megatron.data import BYTE_VOCAB, CORPORA, TokenWindows, batches, mock_tokens, stdlib_tokens
from forge_megatron.training import CHECKPOINT_PREFIX, ForgeController, add_forge_args, validate_forge_args


def add_launcher_args(parser):
    add_forge_args(parser)
    group = parser.add_argument_group("forge-pretrain-gpt")
    group.add_argument("--forge-corpus", default=None, choices=CORPORA,
                       help="Embedded training data: 'stdlib' = the Python standard library's source as bytes "
                            "(vocabulary 257); 'mock' = megatron-core's mock GPT tokens (as --mock-data).")
    group.add_argument("--forge-log-json", default=None,
                       help="Also write one JSON line per iteration (loss, lr, wd, grad norm, ...) to this file.")
    return parser


def main(argv: list[str] | None = None) -> None:
    run(argv)


def run(argv: list[str] | None = None, baseline: dict | None = None) -> dict:
    """Train; returns {"history": per-iteration records, "model": the trained GPTModel}.
    `baseline` holds BaselineOptimizer options (master_weights, optimizer_class, ...)."""
    args = _parse_args(argv)
    trainer = Trainer(args, baseline)
    try:
        return trainer.train()
    finally:
        trainer.close()


class Trainer:
    def __init__(self, args, baseline: dict | None = None):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
        from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
        from megatron.core.transformer.module import Float16Module
        from megatron.training.arguments import core_transformer_config_from_args
        from megatron.training.training import (
            get_megatron_ddp_config,
            get_megatron_optimizer_config,
            get_optimizer_param_scheduler,
        )

        self.args = args
        self.rank = dist.get_rank()
        if args.pipeline_model_parallel_size != 1 or args.data_parallel_size != 1:
            raise ValueError("forge-pretrain-gpt runs data-parallel and pipeline size 1 (use tensor parallelism, or "
                             "Megatron-LM's pretrain_gpt.py with patches/ for other layouts)")
        self.forge_config = validate_forge_args(args) if args.use_forge else None
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size)
        init_num_microbatches_calculator(self.rank, None, args.global_batch_size, args.micro_batch_size,
                                         args.data_parallel_size)
        self.num_microbatches = args.global_batch_size // args.micro_batch_size
        model_parallel_cuda_manual_seed(args.seed)
        torch.manual_seed(args.seed)

        self.train_data, self.valid_data, vocab = self._datasets()
        args.padded_vocab_size = vocab_size_with_padding(vocab, args, logging_enabled=False)
        self.config = core_transformer_config_from_args(args)
        self.model = self._build_model()
        module = Float16Module(self.config, self.model) if args.bf16 else self.model
        self.ddp = DistributedDataParallel(self.config, get_megatron_ddp_config(args), module)
        self.config.no_sync_func = self.ddp.no_sync
        self.config.finalize_model_grads_func = finalize_model_grads

        optimizer_config, overrides = get_megatron_optimizer_config(args)
        self.optimizer = BaselineOptimizer([self.ddp], optimizer_config, overrides, **(baseline or {}))
        self.scheduler = get_optimizer_param_scheduler(self.optimizer)
        self.forge = None
        if args.use_forge:
            self.forge = ForgeController([self.ddp], optimizer_config, overrides, clip_grad=args.clip_grad,
                                         clip_mode=args.forge_clip_grad_mode,
                                         model_parallel_group=parallel_state.get_model_parallel_group())
            self.forge.attach_scheduler(self.scheduler)
        self.iteration = self._load_checkpoint() if args.load else 0
        self.json_log = open(args.forge_log_json, "a") if args.forge_log_json and self.rank == 0 else None
        self._log_setup()

    # -- building -------------------------------------------------------------------------------

    def _datasets(self):
        args = self.args
        corpus = args.forge_corpus or ("mock" if args.mock_data else None)
        if corpus is None:
            raise ValueError("forge-pretrain-gpt reads --mock-data or --forge-corpus stdlib; for indexed datasets "
                             "use Megatron-LM's pretrain_gpt.py with patches/")
        if corpus == "stdlib":
            train, valid, vocab = stdlib_tokens("train"), stdlib_tokens("valid"), BYTE_VOCAB
        else:
            vocab = args.vocab_size or 1024
            n = (args.train_iters + 1) * args.global_batch_size * (args.seq_length + 1)
            tokens = mock_tokens(vocab, n + 64 * (args.seq_length + 1))
            train, valid = tokens[:n], tokens[n:]
        return (TokenWindows(train, args.seq_length, args.seed), TokenWindows(valid, args.seq_length, args.seed + 1),
                vocab)

    def _build_model(self):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from forge_megatron.attention import with_core_attention
        from forge_megatron.spec import cover_output_layer, get_gpt_layer_forge_spec

        args = self.args
        spec_kwargs = dict(normalization=args.normalization, qk_layernorm=args.qk_layernorm)
        spec = (get_gpt_layer_forge_spec(self.forge_config, **spec_kwargs) if args.use_forge
                else get_gpt_layer_local_spec(**spec_kwargs))
        spec = with_core_attention(spec, args.forge_core_attention)
        model = GPTModel(config=self.config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                         max_sequence_length=args.max_position_embeddings, pre_process=True, post_process=True,
                         parallel_output=True,
                         share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                         position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                         rotary_base=args.rotary_base)
        if args.use_forge and args.forge_cover_output_layer:
            cover_output_layer(model, self.forge_config)
        return model

    # -- training ---------------------------------------------------------------------------------

    def train(self) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        args = self.args
        data = batches(self.train_data, args.micro_batch_size, self.iteration * args.global_batch_size)
        forward_backward = get_forward_backward_func()
        read_and_reset_peak()  # each record's peak is its step's, not the set-up's
        start, history = time.perf_counter(), []
        while self.iteration < args.train_iters:
            default = self.optimizer.param_groups[0]  # Megatron's default group: no overrides
            lr, wd = default["lr"], default["weight_decay"]
            forge_hp = None if self.forge is None else [
                (p.state.hyperparameters["lr"], p.state.hyperparameters["weight_decay"]) for p in self.forge.params]
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            step_kwargs = dict(forward_step_func=self._forward_step, data_iterator=data, model=[self.ddp],
                               num_microbatches=self.num_microbatches, seq_length=args.seq_length,
                               micro_batch_size=args.micro_batch_size, forward_only=False)
            if self.forge is not None:
                losses = self.forge.forward_backward(forward_backward, zero_grads=self.ddp.zero_grad_buffer,
                                                     **step_kwargs)
                grad_norm = self.forge.global_grad_norm(self.optimizer.local_grad_sumsq())
                coefficient = self.forge.clip_coefficient()
            else:
                losses = forward_backward(**step_kwargs)
                grad_norm = _global_norm(self.optimizer.local_grad_sumsq())
                coefficient = min(1.0, args.clip_grad / (grad_norm + 1.0e-6)) if args.clip_grad > 0 else 1.0
            self.optimizer.step(coefficient)
            self.scheduler.step(increment=args.global_batch_size)
            self.iteration += 1
            loss = _mean_loss(losses)
            # The step's peak (forward, backward with FORGE's updates, step); reading it synchronizes
            # the GPU, so the elapsed time below includes the step's kernels.
            peak = read_and_reset_peak()
            record = {"iteration": self.iteration, "lm loss": loss, "lr": lr, "weight_decay": wd,
                      "grad norm": grad_norm, "elapsed_s": time.perf_counter() - start}
            if peak is not None:
                record["max_memory_allocated"] = peak
            if self.forge is not None:
                record["forge nonfinite"] = self.forge.nonfinite
                record["forge lr, wd"] = forge_hp
                record["forge grad scale"] = self.forge.params[0].grad_scale
            history.append(record)
            self._log(record)
            if args.eval_interval and self.iteration % args.eval_interval == 0:
                record["validation lm loss"] = self.evaluate()
            if args.save and args.save_interval and self.iteration % args.save_interval == 0:
                self.save_checkpoint()
        if args.save and (not args.save_interval or self.iteration % args.save_interval):
            self.save_checkpoint()
        return {"history": history, "model": self.model}

    def evaluate(self) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        args = self.args
        data = batches(self.valid_data, args.micro_batch_size)
        self.ddp.eval()
        totals = []
        with torch.no_grad():
            for _ in range(args.eval_iters):
                totals.append(_mean_loss(get_forward_backward_func()(
                    forward_step_func=self._forward_step, data_iterator=data, model=[self.ddp],
                    num_microbatches=self.num_microbatches, seq_length=args.seq_length,
                    micro_batch_size=args.micro_batch_size, forward_only=True)))
        self.ddp.train()
        loss = sum(totals) / len(totals)
        self._print(f" validation loss at iteration {self.iteration} | lm loss value: {loss:.6E} | "
                    f"lm loss PPL: {torch.exp(torch.tensor(min(loss, 20.0))).item():.6E}")
        return loss

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        batch = {k: v.to(device) for k, v in batch.items()}
        seq = batch["tokens"].shape[1]
        # SDPAttention's causal kernel needs no mask (flash attention takes none); Megatron's local
        # attention builds its default one on "cuda", so it gets one built here.
        mask = (None if self.args.forge_core_attention == "sdpa"
                else torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device), 1))
        output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"])

    # -- checkpoints ------------------------------------------------------------------------------

    def _sharded_state_dict(self, loading: bool) -> dict:
        from megatron.core import parallel_state

        metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        model_sd = self.model.sharded_state_dict(metadata=metadata)
        sd = {"model": model_sd}
        if self._with_optimizer(loading):
            sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=loading)
            if self.forge is not None:
                sd["forge"] = self.forge.sharded_state_dict(model_sd)
        return sd

    def _with_optimizer(self, loading: bool) -> bool:
        args = self.args
        return not (args.no_load_optim or args.finetune) if loading else not args.no_save_optim

    def save_checkpoint(self) -> None:
        from megatron.core import dist_checkpointing

        path = os.path.join(self.args.save, f"iter_{self.iteration:07d}")
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        sd = self._sharded_state_dict(loading=False)
        sd["iteration"] = self.iteration
        if self._with_optimizer(loading=False):
            sd["opt_param_scheduler"] = self.scheduler.state_dict()
        dist_checkpointing.save(sd, path)
        if self.rank == 0:
            with open(os.path.join(self.args.save, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(self.iteration))
        dist.barrier()
        self._print(f" successfully saved checkpoint at iteration {self.iteration} to {self.args.save}")

    def _load_checkpoint(self) -> int:
        from megatron.core import dist_checkpointing

        args = self.args
        tracker = os.path.join(args.load, "latest_checkpointed_iteration.txt")
        if not os.path.exists(tracker):
            self._print(f" WARNING: no checkpoint found in {args.load}; training from scratch")
            return 0
        with open(tracker) as f:
            iteration = int(f.read().strip())
        path = os.path.join(args.load, f"iter_{iteration:07d}")
        sd = self._sharded_state_dict(loading=True)
        saved = dist_checkpointing.load_tensors_metadata(path)
        if "forge" in sd and not any(k.startswith(CHECKPOINT_PREFIX) for k in saved):
            self._print(" checkpoint holds no FORGE state (saved without --use-forge, or with --no-save-optim): "
                        "FORGE state starts fresh")
            del sd["forge"]
        if "optimizer" in sd and not any(k.startswith(BaselineOptimizer.CHECKPOINT_PREFIX) for k in saved):
            self._print(" checkpoint holds no optimizer state: the optimizer starts fresh")
            del sd["optimizer"]
        loaded = dist_checkpointing.load(sd, path)
        self.model.load_state_dict(loaded["model"], strict=False)
        if "optimizer" in sd:
            self.optimizer.load_sharded_state_dict(loaded["optimizer"])
            if "opt_param_scheduler" in loaded:
                self.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if "forge" in sd:
            self.forge.load_sharded_state_dict(loaded["forge"])
        if self.forge is not None:
            self.forge.apply_schedule(self.scheduler)
        start = 0 if args.finetune else int(loaded["iteration"])
        self._print(f" loaded checkpoint {path} (iteration {iteration}); starting at iteration {start}")
        return start

    # -- logging ----------------------------------------------------------------------------------

    def _log_setup(self) -> None:
        if self.forge is None:
            return
        grad_bytes = 4 if (self.args.accumulate_allreduce_grads_in_fp32 or not self.args.bf16) else 2
        self.forge_saved_bytes = self.forge.num_parameters() * grad_bytes
        total = sum(p.numel() for p in self.model.parameters())
        buffered = sum(b.numel_unpadded for b in self.ddp.buffers)
        self._print(f" FORGE: {len(self.forge.params)} weights, {self.forge.num_parameters():,} of {total:,} "
                    f"parameters on this rank; DDP grad buffers hold {buffered:,} elements; weight-gradient memory "
                    f"not allocated: {self.forge_saved_bytes / 2**20:.2f} MiB; clipping: {self.forge.clip_mode}")

    def _log(self, record: dict) -> None:
        args = self.args
        if self.json_log is not None:
            self.json_log.write(json.dumps(record) + "\n")
            self.json_log.flush()
        if self.iteration % args.log_interval and self.iteration != args.train_iters:
            return
        line = (f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {self.iteration:8d}/{args.train_iters:8d} | "
                f"consumed samples: {self.iteration * args.global_batch_size:12d} | "
                f"elapsed time per iteration (ms): {1000 * record['elapsed_s'] / self.iteration:.1f} | "
                f"learning rate: {record['lr']:.6E} | global batch size: {args.global_batch_size:5d} | "
                f"lm loss: {record['lm loss']:.6E} | grad norm: {record['grad norm']:.3f} |")
        if self.forge is not None:
            line += (f" forge non-finite: {record['forge nonfinite']} | forge grad memory not allocated: "
                     f"{self.forge_saved_bytes / 2**20:.2f} MiB |")
        self._print(line)

    def _print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def close(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.num_microbatches_calculator import unset_num_microbatches_calculator

        if self.json_log is not None:
            self.json_log.close()
        parallel_state.destroy_model_parallel()
        unset_num_microbatches_calculator()


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}


def _mean_loss(losses: list[dict]) -> float:
    total = sum(d["lm loss"][0] for d in losses)
    tokens = sum(d["lm loss"][1] for d in losses)
    return float(total / tokens)


def _global_norm(local_sumsq: torch.Tensor) -> float:
    from megatron.core import parallel_state

    total = local_sumsq.double()  # as ForgeController.global_grad_norm
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total.sqrt())


def _parse_args(argv):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_args

    with _argv(argv):
        args = parse_args(extra_args_provider=add_launcher_args)
    _init_distributed(args)
    _disable_unavailable_fusions(args)
    args.transformer_impl = "local"
    validate_args(args)
    set_args(args)
    return args


def _init_distributed(args) -> None:
    # Megatron's TP/SP overlap (and FORGE's: the dgrad collective is issued before the fused
    # update) needs kernels launched in program order on GPUs.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if dist.is_initialized():  # embedded in a process that set up its own group
        args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
        return
    if "WORLD_SIZE" not in os.environ:  # a plain process: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _disable_unavailable_fusions(args) -> None:
    """Turn off the fusions whose kernels this machine lacks (TE, Apex, CUDA), saying which."""
    off = []
    if importlib.util.find_spec("transformer_engine") is None:
        off += ["apply_rope_fusion"]
    if importlib.util.find_spec("apex") is None:
        off += ["gradient_accumulation_fusion"]
        if not args.no_persist_layer_norm:
            args.no_persist_layer_norm = True
            off_names = ["persist_layer_norm"]
        else:
            off_names = []
    else:
        off_names = []
    if not torch.cuda.is_available():
        from forge_megatron.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
        args.use_cpu_initialization = True
        off += ["masked_softmax_fusion", "bias_gelu_fusion", "bias_swiglu_fusion", "bias_dropout_fusion",
                "cross_entropy_loss_fusion"]
    turned_off = off_names + [name for name in off if getattr(args, name, False)]
    for name in turned_off:
        if hasattr(args, name):
            setattr(args, name, False)
    if turned_off and args.rank == 0:
        print(f" forge-pretrain-gpt: no kernels for {', '.join(turned_off)} on this machine; turned off", flush=True)


@contextmanager
def _argv(argv):
    saved = sys.argv
    sys.argv = [saved[0]] + list(argv if argv is not None else saved[1:])
    try:
        yield
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
