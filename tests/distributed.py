"""Run scenario functions on N gloo ranks on CPU: one spawn per test module, many scenarios.

A scenario is a module-level function taking no arguments; it sets up Megatron's model
parallelism itself (or, with megatron=False, uses the plain torch.distributed world, and Megatron
is not imported), asserts inside the worker and returns something picklable. `run_scenarios`
returns {name: [result of rank 0, rank 1, ...]}; a scenario that raised on any rank reports
the traceback, which `result()` re-raises in the test that reads it, and a rank that died
without reporting fails the test at once. On a machine with CUDA the ranks run on it as they
are (gloo still carries the process group: these scenarios exchange CPU tensors, if any); without
it, Megatron's loop is shimmed for the CPU (forge_megatron/megatron/cpu.py).
"""

from __future__ import annotations

import queue as queues
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 600


class ScenarioError(AssertionError):
    pass


def run_scenarios(world_size: int, scenarios, megatron: bool = True) -> dict[str, list]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # The test process hosts the ranks' store on a port the kernel picks as it binds (no port
    # number is chosen first and raced for by the other xdist worker's runs).
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    port = store.port
    procs = [ctx.Process(target=_worker, args=(rank, world_size, port, scenarios, queue, megatron))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    results: dict[str, list] = {fn.__name__: [None] * world_size for fn in scenarios}
    deadline, pending = time.monotonic() + TIMEOUT_S, world_size * len(scenarios)
    while pending:
        try:
            name, rank, outcome = queue.get(timeout=5)
        except queues.Empty:
            dead = {rank: p.exitcode for rank, p in enumerate(procs) if p.exitcode not in (None, 0)}
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise ScenarioError(f"ranks {dead} exited before reporting" if dead else
                                    f"no report within {TIMEOUT_S} s") from None
            continue
        results[name][rank] = outcome
        pending -= 1
    for p in procs:
        p.join(timeout=60)
    return results


def result(results: dict[str, list], name: str) -> list:
    """Per-rank return values of a scenario; raises with the worker's traceback if it failed."""
    outcomes = results[name]
    errors = [f"rank {r}:\n{o[1]}" for r, o in enumerate(outcomes) if o[0] == "error"]
    if errors:
        raise ScenarioError("\n".join(errors))
    return [o[1] for o in outcomes]


def _worker(rank, world_size, port, scenarios, queue, megatron):
    torch.set_num_threads(1)
    if megatron:
        from megatron.core import parallel_state

    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        elif megatron:
            from forge_megatron.megatron.cpu import enable_megatron_on_cpu

            enable_megatron_on_cpu()
        # A rank that fails inside a collective must not hang the others for gloo's 30-minute default.
        timeout = timedelta(seconds=120)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    except BaseException:  # every scenario reports the set-up's failure
        for fn in scenarios:
            queue.put((fn.__name__, rank, ("error", traceback.format_exc())))
        return
    for fn in scenarios:
        try:
            outcome = ("ok", fn())
        except BaseException:  # reported to the test, which fails with this traceback
            outcome = ("error", traceback.format_exc())
        finally:
            if megatron:
                parallel_state.destroy_model_parallel()
        queue.put((fn.__name__, rank, outcome))
    dist.destroy_process_group()
