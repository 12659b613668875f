"""A process that is a torch.distributed world of one, without a port to race for.

Picking a free port (bind to 0, close, hand the number on) races with every other process on the
machine that does the same: under pytest-xdist two runs got the same port and one failed with
EADDRINUSE. Here no port number is ever handed on: an in-process store when we create the group,
and port 0 (the store's server binds an ephemeral port itself) when Megatron creates it from the
environment. Launches of several ranks use `torchrun --standalone`, whose agent does the same.
"""

from __future__ import annotations

import os


def init_world_of_one(backend: str = "gloo") -> None:
    """A default process group of one rank (unless one exists), over an in-process store."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def export_world_of_one() -> None:
    """The environment Megatron's `init_process_group` (env://) reads, for a world of one: rank 0
    hosts the store on a port the kernel chooses when it binds. Nothing if launched by torchrun."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
