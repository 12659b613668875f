"""The step's data flow on the device: a covered layer's backward, and a standalone fused_update
once its slots exist, neither synchronize with the host nor copy anything to the device; and a
step (the table advanced on the device, a covered layer's forward and backward) repeats the same
device ops on the same memory with the same arguments at every step, so that a CUDA graph
captured at one step replays the next (CUDA graphs need a GPU; what they need of the data flow
is checked here, on CPU, with the Triton kernel interpreted).

Seen with a dispatch mode that sees every aten op and with Tensor's host-reading methods
wrapped: `.item()`, `float()`, `bool()` (aten._local_scalar_dense), `nonzero`, `.cpu()`,
`.tolist()`, `.numpy()` read the device on a GPU; `torch.tensor(data)` (aten.lift_fresh) copies
host data to it. The interpreter's own work stands for the one kernel launch and is not watched.
"""

import contextlib

import pytest
import torch
from helpers import assert_bits_equal, randn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from forge_megatron import ForgeConfig, ForgeState, fused_update
from forge_megatron.core import kernels
from forge_megatron.core.param import ForgeParam
from forge_megatron.core.table import LR, StepTable
from forge_megatron.core.update import step_tiles
from forge_megatron.megatron.autograd import forge_linear

HOST_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "unique",
            "_unique2", "lift_fresh", "lift_fresh_copy"}
HOST_METHODS = ("cpu", "tolist", "numpy", "item")
SHAPES = ((72, 48), (40, 64))  # two covered weights [out, in]
TOKENS = 24


class DeviceTrace(TorchDispatchMode):
    """Every aten op, with its arguments: tensors by where they live (a tensor made outside the
    traced region by its address, one made inside by the order it was made in: a graph's private
    pool), everything else by value; and what would wait for the device or copy from the host.
    Kernel launches are recorded the same way, with the interpreter's own work left out."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.host: list[str] = []
        self._made: dict[int, str] = {}
        self._count = 0
        self._paused = False

    def label(self, value):
        if isinstance(value, torch.Tensor):
            ptr = value.untyped_storage().data_ptr()
            return (self._made.get(ptr, f"external@{ptr}"), value.storage_offset(), tuple(value.shape),
                    value.stride(), value.dtype)
        if isinstance(value, (tuple, list)):
            return tuple(self.label(v) for v in value)
        return value if isinstance(value, (int, float, bool, str, type(None), torch.dtype)) else type(value).__name__

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in HOST_OPS:
            self.host.append(name)
        arguments = self.label((args, sorted(kwargs.items())))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._made[t.untyped_storage().data_ptr()] = f"made#{self._count}"
                self._count += 1
        self.ops.append((str(func), arguments))
        return out

    @contextlib.contextmanager
    def launches_recorded(self):
        launch = kernels.launch

        def recorded(x, dy, weight, plan, config):
            args, kwargs = kernels._launch_arguments(x, dy, weight, plan, config)
            self.ops.append(("launch", self.label(args), self.label(sorted((k, v) for k, v in kwargs.items()
                                                                          if k != "UPDATE"))))
            self._paused = True
            try:
                return launch(x, dy, weight, plan, config)
            finally:
                self._paused = False

        kernels.launch = recorded
        try:
            yield
        finally:
            kernels.launch = launch


@contextlib.contextmanager
def traced():
    """A DeviceTrace over the block, Tensor's host-reading methods counted in its `host` list."""
    trace = DeviceTrace()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}

    def counted(name):
        def method(self, *args, **kwargs):
            if not trace._paused:
                trace.host.append(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)
        return method

    for name in HOST_METHODS:
        setattr(torch.Tensor, name, counted(name))
    try:
        with trace.launches_recorded(), trace:
            yield trace
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def _layers(gen, config: ForgeConfig, device):
    weights = [randn(gen, *shape, device=device) for shape in SHAPES]
    return weights, [ForgeParam(w, config) for w in weights]


def _forward_backward(weights, params, xs, dys):
    for weight, param, x, dy in zip(weights, params, xs, dys):
        out = forge_linear(x, weight, None, param, allreduce_dgrad=False, sequence_parallel=False, tp_group=None)
        out.backward(dy)


def _inputs(gen, device):
    xs = [randn(gen, TOKENS, 1, n_in, device=device).requires_grad_(True) for _, n_in in SHAPES]
    return xs, [randn(gen, TOKENS, 1, n_out, device=device) for n_out, _ in SHAPES]


@pytest.mark.parametrize("bound", [False, True], ids=["standalone", "bound to a table"])
def test_a_covered_backward_neither_waits_for_the_device_nor_copies_from_the_host(bound, gen, device):
    """ForgeLinearFunction's backward through a ForgeParam (its scale from the host, or bound to a
    StepTable) and a standalone fused_update, at the second and third steps (the first makes the
    standalone slots): no op that reads the device on the host, none that copies host data."""
    weights, params = _layers(gen, ForgeConfig("adamw", {"lr": 1e-2, "weight_decay": 0.1}, backend="triton"), device)
    table = None
    if bound:
        table = StepTable([p.state for p in params], [step_tiles(w, p.state, "triton") for w, p in
                                                       zip(weights, params)], weights[0].device)
        for param, slots in zip(params, table.slots):
            param.bind(slots)
    else:
        params[1].grad_scale = torch.tensor(0.5, device=device)  # a device tensor (a clip coefficient) is taken as it is
    standalone_weight = weights[0].clone()
    standalone = ForgeState(standalone_weight, "sgd", lr=0.1, momentum=0.9)
    for step in (1, 2, 3):
        xs, dys = _inputs(gen, device)
        if table is not None:
            table.write(0.5)
            for p in params:
                p.begin_iteration(1)
        with traced() if step > 1 else contextlib.nullcontext() as trace:
            _forward_backward(weights, params, xs, dys)
            fused_update(xs[0].detach(), dys[0], standalone_weight, standalone, backend="triton")
        if trace is not None:
            assert trace.host == [], (step, trace.host)
            assert sum(op[0] == "launch" for op in trace.ops) == 3
    assert all(p.state.step == 3 for p in params) and standalone.step == 3
    assert torch.isfinite(standalone_weight).all()


def test_the_standalone_path_keeps_its_slots_and_copies_only_what_changed(gen, device):
    """fused_update without slots reuses the state's device slots: at a step after the last, with
    the same lr and weight decay, nothing is copied to the device (the step advances there); after
    an lr change, one copy; after a step set by hand, one copy; the coefficients are the host's."""
    weight = randn(gen, 40, 64, device=device)
    state = ForgeState(weight, "adamw", lr=1e-2)
    x, dy = randn(gen, 8, 64, device=device), randn(gen, 8, 40, device=device)
    fused_update(x, dy, weight, state, backend="triton")
    slots = state.own_table.slots[0]
    for change, copies in ((None, 0), ("lr", 1), (None, 0), ("step", 1)):
        if change == "lr":
            state.set_hyperparameters(lr=5e-3)
        elif change == "step":
            state.step = 10
        with traced() as trace:
            state.own_table.write(1.0)
        assert sum(op[0] == "aten.lift_fresh.default" for op in trace.ops) == copies, (change, trace.ops)
        expected = torch.tensor([1.0, state.step + 1, *state.rule.coefficients(state.hyperparameters, state.step + 1)],
                                dtype=torch.float64).float()
        assert_bits_equal(slots.coefs[:len(expected)], expected, f"after {change}")
        fused_update(x, dy, weight, state, backend="triton")
    assert state.own_table.slots[0] is slots


def test_a_step_repeats_the_same_device_work_so_a_graph_of_it_replays(gen, device):
    """The region a CUDA graph would capture: the table advanced on the device (step + 1, every
    rule's coefficients derived from the device schedule), then two covered layers' forward and
    backward from static input buffers. After a warm-up step, steps 2 and 3 run the same ops and launches on the same
    memory with the same non-tensor arguments (tensors made inside the region by their order, as a
    graph's pool gives them), with no host reads or copies; what changes between steps comes from
    device memory the host writes outside the region (the inputs, an lr). After three steps the
    weights and states are those of three eager steps with the host's coefficients."""
    config = ForgeConfig("adamw", {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.9)}, backend="triton")
    weights, params = _layers(gen, config, device)
    start = [w.clone() for w in weights]
    table = StepTable([p.state for p in params], [step_tiles(w, p.state, "triton") for w, p in zip(weights, params)],
                      weights[0].device)
    for param, slots in zip(params, table.slots):
        param.bind(slots)
    static_x, static_dy = _inputs(gen, device)
    table.write(1.0)  # step 1's rows (host values, one copy)
    table.schedule[:, 2] -= 1  # so that the region's advance gives step 1
    regions, feeds = [], []
    for step in (1, 2, 3):
        xs, dys = _inputs(gen, device)
        lr = 1e-2 if step < 3 else 4e-3
        feeds.append((xs, dys, lr))
        with torch.no_grad():  # the host fills the static buffers and the schedule, outside the region
            for buffer, value in zip(static_x + static_dy, xs + dys):
                buffer.copy_(value)
            table.schedule[:, LR].fill_(lr)
        for p in params:
            p.begin_iteration(1)
        with traced() if step > 1 else contextlib.nullcontext() as trace:  # step 1: the warm-up, as before a capture
            table.advance()
            _forward_backward(weights, params, static_x, static_dy)
        for x in static_x:
            x.grad = None
        if trace is not None:
            assert trace.host == [], (step, trace.host)
            regions.append(trace.ops)
    assert regions[0] == regions[1]
    assert sum(op[0] == "launch" for op in regions[1]) == len(weights)

    for weight, w0, param in zip(weights, start, params):  # the same three steps, eagerly
        state = ForgeState(w0, "adamw", lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), weight_id=param.state.weight_id)
        for xs, dys, lr in feeds:
            state.set_hyperparameters(lr=lr)
            k = [w.shape for w in weights].index(weight.shape)
            fused_update(xs[k].detach(), dys[k], w0, state, backend="triton")
        assert_bits_equal(weight, w0, "weight")
        for name, tensor in state.tensors.items():
            assert_bits_equal(param.state.tensors[name], tensor, name)


@pytest.mark.parametrize("flags, named", [
    ([], None),
    (["--cuda-graph-impl", "local"], "--cuda-graph-impl local"),
    (["--cuda-graph-impl", "full_iteration"], "--cuda-graph-impl full_iteration"),
    (["--enable-cuda-graph"], "--enable-cuda-graph"),
    (["--external-cuda-graph", "--optimizer-cuda-graph"], "--external-cuda-graph and --optimizer-cuda-graph"),
])
def test_megatrons_cuda_graph_options_are_refused_in_one_line(flags, named, monkeypatch):
    """Parsed by Megatron's own parser (megatron-core 0.19.2's names); the line names the flags."""
    from megatron.training.arguments import parse_args

    from forge_megatron.megatron.args import cuda_graph_refusal

    monkeypatch.setattr("sys.argv", ["pretrain_gpt.py", *flags])
    refusal = cuda_graph_refusal(parse_args())
    if named is None:
        assert refusal is None
    else:
        assert refusal.startswith(named) and refusal.endswith("drop them" if " and " in named else "drop it")
        assert "\n" not in refusal


def test_every_weights_slots_reach_the_kernel_aligned(device):
    """Triton compiles a kernel variant per pointer alignment: each weight's coefficient row (64
    bytes) and by-products (16-byte aligned, the padding rows zero) are aligned alike, whatever
    the tile counts before them; the padding changes no total."""
    from forge_megatron.core.table import WIDTH

    states = [ForgeState(torch.zeros(4, 4, device=device), "sgd", lr=0.1) for _ in range(4)]
    table = StepTable(states, [3, 5, 2, 1], device)
    for slots, tiles in zip(table.slots, [3, 5, 2, 1]):
        assert slots.coefs.data_ptr() % 64 == 0 and slots.stats.data_ptr() % 16 == 0
        assert slots.coefs.shape == (WIDTH,) and slots.stats.shape == (tiles, 2)
        slots.stats.fill_(1.0)
    assert table.totals().tolist() == [11.0, 11.0]
