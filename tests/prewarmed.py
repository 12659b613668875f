"""Megatron runs for the tests, forked from processes that have already imported torch, Megatron
and FORGE.

Each rank of a forge-pretrain-gpt run spends about 10 s of CPU importing torch and Megatron before
it trains for 2; a test file launches dozens of runs. Here a server process per concurrent run
imports them once, then forks every rank of each run from that state. A forked rank runs the same
entry module (`python -m forge_megatron.cli.pretrain_gpt`'s `__main__`) with the same arguments and
the environment torchrun gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
OMP_NUM_THREADS=1), its stdout and stderr captured; the launch returns what subprocess.run would.
The launcher itself (torchrun, the console script) is tested by the tests that run the scripts.

    python tests/prewarmed.py   # a server: one JSON request per line on stdin, one reply per run
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time

from forge_megatron.tools import benchmarking

launch_in_subprocess = benchmarking.launch  # torchrun itself, for the tests of what torchrun shows

# What forge-pretrain-gpt imports before it trains (importing is all a server does before forking;
# the entry modules themselves are left to the rank, which runs them as __main__).
PRELOAD = ("torch", "megatron.training", "megatron.training.training", "megatron.core.models.gpt",
           "megatron.core.transformer.moe.moe_layer", "megatron.core.transformer.multi_latent_attention",
           "megatron.core.dist_checkpointing", "megatron.core.tokenizers.text.text_tokenizer",  # transformers
           "megatron.core.datasets.blended_megatron_dataset_builder", "megatron.core.datasets.indexed_dataset",
           "multiprocessing.managers", "forge_megatron.megatron.hook", "forge_megatron.megatron.cpu",
           "forge_megatron.tools.benchmarking", "tensorboard")


def launch(module: str, argv: list[str], nproc: int, env: dict, timeout: float | None) -> subprocess.CompletedProcess:
    """`python -m module *argv` as `nproc` ranks (torchrun's environment when nproc > 1) with
    environment `env`; past `timeout` seconds every rank is killed and TimeoutExpired raised."""
    server = _idle.get() if not _idle.empty() else _Server()
    try:
        return server.run(module, argv, nproc, env, timeout)
    finally:
        _idle.put(server)


class _Server:
    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)

    def run(self, module, argv, nproc, env, timeout) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as folder:
            out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
            request = {"module": module, "argv": argv, "nproc": nproc, "env": env, "out": out, "err": err,
                       "timeout": timeout}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the prewarmed Megatron server exited")
            reply = json.loads(line)
            stdout, stderr = (open(path, errors="replace").read() if os.path.exists(path) else "" for path in (out, err))
        cmd = [sys.executable, "-m", module, *argv]
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, reply["returncode"], stdout, stderr)


_idle: queue.Queue[_Server] = queue.Queue()  # servers between runs (two runs at a time get two servers)


# --- the server side -------------------------------------------------------------------------

def _serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        returncode, timed_out = _run_ranks(request)
        sys.stdout.write(json.dumps({"returncode": returncode, "timed_out": timed_out}) + "\n")
        sys.stdout.flush()


def _run_ranks(request: dict) -> tuple[int, bool]:
    """Fork the ranks of one run and wait for them. Like torchrun's agent, this process serves the
    run's store on a socket it bound before forking (TORCHELASTIC_USE_AGENT_STORE), so no port is
    picked, released and raced for by a concurrent run or an outgoing connection."""
    import torch.distributed

    nproc = request["nproc"]
    listener = socket.create_server(("127.0.0.1", 0)) if nproc > 1 else None
    port = listener.getsockname()[1] if listener is not None else None
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    pids = []
    for rank in range(nproc):
        env = dict(request["env"])
        if listener is not None:  # what torchrun --standalone gives each rank
            env.setdefault("OMP_NUM_THREADS", "1")
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                       GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                       TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0")
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            if listener is not None:
                listener.close()
            _rank(request["module"], request["argv"], env, out, err)
        pids.append(pid)
    os.close(out)
    os.close(err)
    store = None
    if listener is not None:  # the store owns (and closes) the socket it is given: a duplicate
        store = torch.distributed.TCPStore("127.0.0.1", port, nproc, is_master=True,
                                           wait_for_workers=False, master_listen_fd=os.dup(listener.fileno()))
        listener.close()
    try:
        return _wait(pids, request["timeout"])
    finally:
        del store


def _rank(module: str, argv: list[str], env: dict, out: int, err: int) -> None:
    """In the forked child: become `python -m module *argv` and exit with its status."""
    import atexit
    import runpy
    import traceback

    code = 1
    try:
        os.setpgid(0, 0)  # the rank and its data-loader workers: one group to kill on a timeout
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.clear()
        os.environ.update(env)
        import torch

        if "OMP_NUM_THREADS" in env:
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        sys.argv = [module, *argv]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported as Python would, then the exit status
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what a normal interpreter exit runs (tensorboard's flush among them)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _wait(pids: list[int], timeout: float | None) -> tuple[int, bool]:
    """The first failing rank's status (as subprocess reports it: -signal when killed), or 0; a
    failed rank's peers, and every rank past `timeout`, are killed (torchrun does the same)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    status, running, failed_at = {}, set(pids), None
    while running:
        for pid in list(running):
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                status[pid] = os.waitstatus_to_exitcode(raw)
                if status[pid] != 0 and failed_at is None:
                    failed_at = time.monotonic()
        now = time.monotonic()
        timed_out = deadline is not None and now > deadline
        if running and (timed_out or (failed_at is not None and now - failed_at > 30)):
            for pid in running:
                _kill_group(pid)
            for pid in running:
                status[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            running.clear()
            if timed_out:
                return -signal.SIGKILL, True
        time.sleep(0.05)
    for pid in pids:  # data-loader workers a rank left behind
        _kill_group(pid)
    return next((status[pid] for pid in pids if status[pid] != 0), 0), False


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    _serve()
