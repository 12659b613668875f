"""Element-wise optimizer rules, each defined once and run by both backends.

A rule says four things:

* `states`: the names of its per-weight state tensors (at most MAX_STATES), and, through
  `stored_states` and `state_init`, which of them a given hyperparameter set really allocates
  and their initial value. A state that is not stored reaches `update` as a zero and its new
  value is dropped, so one `update` serves e.g. SGD with and without momentum.
* `nonnegative_states`: states that never go below zero (second moments); 8-bit storage gives
  them the unsigned code table, twice the resolution of the signed one.
* `defaults`: its hyperparameters (torch.optim names), checked by `check`.
* `coefficients(hp, step)`: the scalars the update needs at this step (step counts from 1, as
  in torch.optim), computed in float64 and rounded once to float32. Bias corrections, decoupled
  decay factors and signs live here, not in the update. FORGE derives them on the device
  (table.py), where the scheduled hyperparameters (SCHEDULED: lr, weight_decay) and the step are
  float64 tensors: so the function is written with `+ - * / **` on those, `coefficient_sqrt`
  and `past_first_step`, and branches only on the other hyperparameters (`register_rule`
  checks it runs on tensors and gives the host's values there).
* `workspace_states`, `updates_weight`, `weight_step`: a rule whose step is not element-wise
  (Muon) updates only its states in the epilogue (`updates_weight` False: the weight is neither
  read nor written there) and may write a state that is not kept (a workspace, e.g. Muon's
  Nesterov direction, allocated for one step and handed to the consumer); once a weight's pass
  is done, `weight_step(weight, state, stats)` updates the whole weight (core/muon.py).
* `update(p, g, state, coef) -> (p, state)`: the element-wise formula on fp32 values, written
  with `+ - *` and the `ops` vocabulary (ops.sqrt, ops.div, ops.fma, ops.where, ops.abs, ops.sign,
  ops.maximum, ops.minimum). `register_rule` compiles this one function twice: as a Triton
  JIT function for the kernel's epilogue (`ops` = ops_triton) and as a torch function for the
  tiled backend and for references (`ops` = ops_torch). Both vocabularies are correctly
  rounded fp32, so the two agree bit for bit on the same inputs.

Adding a rule is one class with `@register_rule`; the test suite parametrizes over
`registered_rules()`, so a new rule is checked by every test at once (docs/design.md).
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
import types
from numbers import Real
from typing import Any, Callable, ClassVar, Mapping

import torch
import triton
import triton.language as tl

from forge_megatron.core import muon, ops_torch, ops_triton
from forge_megatron.core import ops_torch as ops  # rebound per backend by register_rule

MAX_STATES = 3
MAX_COEFS = 12
VOCABULARY = tuple(ops_torch.__all__)
SCHEDULED = ("lr", "weight_decay")  # hyperparameters a schedule changes: device tensors in `coefficients`

_RULES: dict[str, type["Rule"]] = {}


class Rule:
    """Base class of an element-wise rule; see the module docstring for the contract."""

    name: ClassVar[str]
    states: ClassVar[tuple[str, ...]] = ()
    nonnegative_states: ClassVar[tuple[str, ...]] = ()  # stored with the unsigned 8-bit code table
    workspace_states: ClassVar[tuple[str, ...]] = ()  # written for the step's consumer, never kept
    updates_weight: ClassVar[bool] = True  # False: the epilogue updates the states only
    weight_step: ClassVar[Callable | None] = None  # the whole weight's update after its pass (updates_weight False)
    defaults: ClassVar[Mapping[str, Any]] = {}

    # Filled in by register_rule.
    num_coefficients: ClassVar[int]  # len(coefficients(...)), the same at every step
    torch_update: ClassVar[Callable]
    triton_update: ClassVar[Any]

    @classmethod
    def check(cls, hp: Mapping[str, Any]) -> None:
        """Raise ValueError for invalid hyperparameter values."""

    @classmethod
    def stored_states(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        """The states this hyperparameter set allocates (default: all)."""
        return cls.states

    @classmethod
    def state_init(cls, hp: Mapping[str, Any]) -> Mapping[str, float]:
        """Initial value of each stored state (default: 0)."""
        return {}

    @classmethod
    def coefficients(cls, hp: Mapping[str, Any], step: int) -> tuple[float, ...]:
        raise NotImplementedError

    @staticmethod
    def update(p, g, state, coef):
        raise NotImplementedError

    @classmethod
    def hyperparameters(cls, **overrides: Any) -> dict[str, Any]:
        """Defaults merged with `overrides`, validated; unknown names are an error."""
        unknown = sorted(set(overrides) - set(cls.defaults))
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {unknown} for rule '{cls.name}'; "
                f"known: {', '.join(cls.defaults)}"
            )
        hp = {**cls.defaults, **overrides}
        for key, value in hp.items():
            _check_type(cls.name, key, value, cls.defaults[key])
        cls.check(hp)
        return hp


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Validate a Rule subclass, compile its update for both backends and register it."""
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise TypeError("register_rule expects a subclass of forge_megatron.core.rules.Rule")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty `name`")
    if name in _RULES and _RULES[name] is not cls:
        raise ValueError(f"a rule named '{name}' is already registered ({_RULES[name].__qualname__})")
    if not set(cls.nonnegative_states) <= set(cls.states):
        raise ValueError(f"rule '{name}': nonnegative_states names states not in `states`")
    if not set(cls.workspace_states) <= set(cls.states):
        raise ValueError(f"rule '{name}': workspace_states names states not in `states`")
    if (cls.weight_step is None) != cls.updates_weight:
        raise ValueError(f"rule '{name}': a rule that does not update the weight in its epilogue (updates_weight "
                         "False) needs a weight_step, and only such a rule has one")
    if len(cls.states) > MAX_STATES:
        raise ValueError(f"rule '{name}' has {len(cls.states)} states; the kernel takes at most {MAX_STATES}")
    fn = inspect.getattr_static(cls, "update")
    if fn is inspect.getattr_static(Rule, "update") or not isinstance(fn, staticmethod):
        raise ValueError(f"rule '{name}': `update` must be a @staticmethod update(p, g, state, coef)")
    fn = fn.__func__
    _check_update_source(name, fn)
    hp = cls.hyperparameters()
    n = len(cls.coefficients(hp, 1))
    if n > MAX_COEFS:
        raise ValueError(f"rule '{name}' has {n} coefficients; the kernel takes at most {MAX_COEFS}")
    unknown_states = set(cls.stored_states(hp)) - set(cls.states)
    if unknown_states:
        raise ValueError(f"rule '{name}': stored_states names {sorted(unknown_states)}, not in `states`")
    _check_coefficients_on_tensors(name, cls, hp)
    cls.num_coefficients = n
    cls.torch_update = staticmethod(_rebind(fn, ops_torch))
    cls.triton_update = triton.jit(_rebind(fn, ops_triton))
    _RULES[name] = cls
    return cls


def coefficient_sqrt(x):
    """The correctly rounded float64 square root of a float or a float64 tensor, for
    `coefficients` (math.sqrt cannot take a tensor)."""
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def past_first_step(step):
    """1.0 after the first step, 0.0 at it (float64 on a tensor step), for `coefficients`: a
    choice made by the step as a factor, never a branch (a branch cannot read a device tensor)."""
    return (step > 1).to(step.dtype) if isinstance(step, torch.Tensor) else float(step > 1)


def _check_coefficients_on_tensors(name: str, cls: type[Rule], hp: Mapping[str, Any]) -> None:
    """`coefficients` with the scheduled hyperparameters and the step as float64 tensors (two
    rows: steps 1 and 3), as table.py derives them on the device, must run and round to the
    host's fp32 values."""
    steps = (1, 3)
    tensors = {k: torch.full((2,), float(hp[k]), dtype=torch.float64) for k in SCHEDULED if k in hp}
    try:
        on_tensors = cls.coefficients({**hp, **tensors}, torch.tensor(steps, dtype=torch.float64))
        rows = [[float(torch.as_tensor(v, dtype=torch.float64).expand(2)[i].float()) for v in on_tensors]
                for i in range(2)]
    except Exception as error:  # noqa: BLE001 - any failure means the rule cannot run on the device
        raise ValueError(
            f"rule '{name}': coefficients(hp, step) must also run with {', '.join(tensors) or 'no hyperparameter'} "
            f"and step as float64 tensors (FORGE derives coefficients on the device): write them with + - * / **, "
            f"coefficient_sqrt and past_first_step, and branch only on the other hyperparameters; it raised "
            f"{type(error).__name__}: {error}") from None
    for step, row in zip(steps, rows):
        host = [float(torch.tensor(float(v), dtype=torch.float64).float()) for v in cls.coefficients(hp, step)]
        if row != host:
            raise ValueError(f"rule '{name}': coefficients at step {step} are {row} on float64 tensors but {host} on "
                             "the host; compute them with the same float64 operations on both")


def get_rule(rule: str | type[Rule]) -> type[Rule]:
    """The registered rule called `rule` (or `rule` itself if it is a registered class)."""
    if isinstance(rule, type) and issubclass(rule, Rule):
        if _RULES.get(rule.name) is not rule:
            raise ValueError(f"rule class {rule.__qualname__} is not registered; decorate it with @register_rule")
        return rule
    if rule not in _RULES:
        raise ValueError(f"unknown rule {rule!r}; registered rules: {', '.join(sorted(_RULES))}")
    return _RULES[rule]


def registered_rules() -> tuple[str, ...]:
    return tuple(sorted(_RULES))


def _rebind(fn: Callable, ops_module: types.ModuleType) -> Callable:
    """A copy of `fn` whose global `ops` is `ops_module` (and `tl` is visible for Triton)."""
    scope = dict(fn.__globals__, ops=ops_module, tl=tl)
    out = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__qualname__, out.__module__, out.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return out


def _check_update_source(name: str, fn: Callable) -> None:
    """Reject what would make the two compiled versions disagree, with the fix in the message."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    params = [a.arg for a in tree.body[0].args.args]
    if len(params) != 4:
        raise ValueError(f"rule '{name}': update must take exactly (p, g, state, coef), got {params}")
    banned = {ast.Div: ("/", "ops.div(a, b)"), ast.Pow: ("**", "a * a, or ops.sqrt(a) for a ** 0.5"),
              ast.FloorDiv: ("//", "a coefficient computed on the host"),
              ast.Mod: ("%", "a coefficient computed on the host")}
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and type(node.op) in banned:
            symbol, fix = banned[type(node.op)]
            raise ValueError(
                f"rule '{name}': operator {symbol} is not allowed in update (Triton's fp32 '/' is "
                f"approximate on GPUs and the backends must agree bit for bit); write {fix}"
            )
        if isinstance(node, ast.Call):
            f = node.func
            ok = (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                  and f.value.id == "ops" and f.attr in VOCABULARY)
            if not ok:
                raise ValueError(
                    f"rule '{name}': update calls {ast.unparse(f)}; only ops.<name> calls are "
                    f"allowed, with <name> in {', '.join(VOCABULARY)}"
                )


def _check_type(rule: str, key: str, value: Any, default: Any) -> None:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"rule '{rule}': {key} must be True or False, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise TypeError(f"rule '{rule}': {key} must be a string, got {value!r}")
    elif isinstance(default, tuple):
        if not (isinstance(value, (tuple, list)) and len(value) == len(default)
                and all(_is_real(v) for v in value)):
            raise TypeError(f"rule '{rule}': {key} must be a tuple of {len(default)} numbers, got {value!r}")
    elif not _is_real(value):
        raise TypeError(f"rule '{rule}': {key} must be a real number, got {value!r}")


def _is_real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _require(rule: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"rule '{rule}': {message}")


def _check_betas(rule: str, betas: tuple[float, ...]) -> None:
    for i, b in enumerate(betas):
        _require(rule, 0.0 <= b < 1.0, f"betas[{i}] must be in [0, 1), got {b}")


# ----------------------------------------------------------------------------------------
# Built-in rules (torch.optim's formulas and conventions; Lion as in Chen et al. 2023)
# ----------------------------------------------------------------------------------------


def _adam_update(p, g, state, coef):
    """Adam with L2 decay folded into g, and AdamW's decoupled decay on p (one is neutral)."""
    exp_avg, exp_avg_sq = state
    l2, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps = coef
    g = g + l2 * p
    p = p * decay
    exp_avg = beta1 * exp_avg + one_minus_beta1 * g
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * (g * g)
    denom = ops.div(ops.sqrt(exp_avg_sq), bias_correction2_sqrt) + eps
    p = p + neg_step_size * ops.div(exp_avg, denom)
    return p, (exp_avg, exp_avg_sq)


@register_rule
class AdamW(Rule):
    """torch.optim.AdamW: decoupled weight decay p <- p * (1 - lr * wd)."""

    name = "adamw"
    states = ("exp_avg", "exp_avg_sq")
    nonnegative_states = ("exp_avg_sq",)
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
    decoupled: ClassVar[bool] = True
    update = staticmethod(_adam_update)

    @classmethod
    def check(cls, hp):
        _require(cls.name, hp["lr"] >= 0, f"lr must be >= 0, got {hp['lr']}")
        _require(cls.name, hp["eps"] >= 0, f"eps must be >= 0, got {hp['eps']}")
        _require(cls.name, hp["weight_decay"] >= 0, f"weight_decay must be >= 0, got {hp['weight_decay']}")
        _check_betas(cls.name, hp["betas"])

    @classmethod
    def coefficients(cls, hp, step):
        lr, wd, (beta1, beta2) = hp["lr"], hp["weight_decay"], hp["betas"]
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        l2, decay = (0.0, 1.0 - lr * wd) if cls.decoupled else (wd, 1.0)
        return (l2, decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, -lr / bias_correction1,
                coefficient_sqrt(bias_correction2), hp["eps"])


@register_rule
class Adam(AdamW):
    """torch.optim.Adam: L2 weight decay g <- g + wd * p (AdamW's formula with decay factor 1)."""

    name = "adam"
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    decoupled = False


@register_rule
class SGD(Rule):
    """torch.optim.SGD: momentum, dampening, nesterov, L2 weight decay.

    The first step sets the buffer to g (torch clones the gradient): momentum and (1 - dampening)
    are replaced by 0 and 1 at step 1 (`past_first_step` scales the momentum and the dampening). Which of g and the buffer moves p is chosen by two
    coefficients, so one formula covers plain, momentum and nesterov SGD exactly.
    """

    name = "sgd"
    states = ("momentum_buffer",)
    defaults = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}

    @classmethod
    def check(cls, hp):
        _require(cls.name, hp["lr"] >= 0, f"lr must be >= 0, got {hp['lr']}")
        _require(cls.name, hp["momentum"] >= 0, f"momentum must be >= 0, got {hp['momentum']}")
        _require(cls.name, 0 <= hp["dampening"] <= 1, f"dampening must be in [0, 1], got {hp['dampening']}")
        _require(cls.name, hp["weight_decay"] >= 0, f"weight_decay must be >= 0, got {hp['weight_decay']}")
        if hp["nesterov"]:
            _require(cls.name, hp["momentum"] > 0 and hp["dampening"] == 0,
                     "nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")

    @classmethod
    def stored_states(cls, hp):
        return cls.states if hp["momentum"] > 0 else ()

    @classmethod
    def coefficients(cls, hp, step):
        momentum = hp["momentum"]
        later = past_first_step(step)  # exactly 0 or 1: momentum * 1 and 1 - dampening * 1 are exact
        buffer_decay, buffer_gain = momentum * later, 1.0 - hp["dampening"] * later
        if momentum == 0:
            g_weight, buffer_weight = 1.0, 0.0
        elif hp["nesterov"]:
            g_weight, buffer_weight = 1.0, momentum
        else:
            g_weight, buffer_weight = 0.0, 1.0
        return (hp["weight_decay"], buffer_decay, buffer_gain, g_weight, buffer_weight, -hp["lr"])

    @staticmethod
    def update(p, g, state, coef):
        (buf,) = state
        l2, buffer_decay, buffer_gain, g_weight, buffer_weight, neg_lr = coef
        g = g + l2 * p
        buf = buffer_decay * buf + buffer_gain * g
        p = p + neg_lr * (g_weight * g + buffer_weight * buf)
        return p, (buf,)


@register_rule
class Lion(Rule):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), decoupled decay."""

    name = "lion"
    states = ("exp_avg",)
    defaults = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}

    @classmethod
    def check(cls, hp):
        _require(cls.name, hp["lr"] >= 0, f"lr must be >= 0, got {hp['lr']}")
        _require(cls.name, hp["weight_decay"] >= 0, f"weight_decay must be >= 0, got {hp['weight_decay']}")
        _check_betas(cls.name, hp["betas"])

    @classmethod
    def coefficients(cls, hp, step):
        lr, (beta1, beta2) = hp["lr"], hp["betas"]
        return (1.0 - lr * hp["weight_decay"], -lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2)

    @staticmethod
    def update(p, g, state, coef):
        (exp_avg,) = state
        decay, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2 = coef
        direction = ops.sign(beta1 * exp_avg + one_minus_beta1 * g)
        p = p * decay + neg_lr * direction
        exp_avg = beta2 * exp_avg + one_minus_beta2 * g
        return p, (exp_avg,)


@register_rule
class RMSprop(Rule):
    """torch.optim.RMSprop: smoothing alpha, optional momentum and centering, L2 weight decay.

    Without centering the gradient average stays zero (its gain is 0); without momentum the
    buffer is a zero that is never stored, so buf = g / avg exactly as torch's addcdiv path.
    """

    name = "rmsprop"
    states = ("square_avg", "momentum_buffer", "grad_avg")
    nonnegative_states = ("square_avg",)
    defaults = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False}

    @classmethod
    def check(cls, hp):
        _require(cls.name, hp["lr"] >= 0, f"lr must be >= 0, got {hp['lr']}")
        _require(cls.name, 0 <= hp["alpha"] < 1, f"alpha must be in [0, 1), got {hp['alpha']}")
        _require(cls.name, hp["eps"] >= 0, f"eps must be >= 0, got {hp['eps']}")
        _require(cls.name, hp["weight_decay"] >= 0, f"weight_decay must be >= 0, got {hp['weight_decay']}")
        _require(cls.name, hp["momentum"] >= 0, f"momentum must be >= 0, got {hp['momentum']}")

    @classmethod
    def stored_states(cls, hp):
        return ("square_avg",) + (("momentum_buffer",) if hp["momentum"] > 0 else ()) + (
            ("grad_avg",) if hp["centered"] else ())

    @classmethod
    def coefficients(cls, hp, step):
        alpha = hp["alpha"]
        grad_avg_gain = 1.0 - alpha if hp["centered"] else 0.0
        return (hp["weight_decay"], alpha, 1.0 - alpha, grad_avg_gain, hp["eps"], hp["momentum"], -hp["lr"])

    @staticmethod
    def update(p, g, state, coef):
        square_avg, buf, grad_avg = state
        l2, alpha, one_minus_alpha, grad_avg_gain, eps, momentum, neg_lr = coef
        g = g + l2 * p
        square_avg = alpha * square_avg + one_minus_alpha * (g * g)
        grad_avg = alpha * grad_avg + grad_avg_gain * g
        avg = ops.sqrt(square_avg - grad_avg * grad_avg) + eps
        buf = momentum * buf + ops.div(g, avg)
        p = p + neg_lr * buf
        return p, (square_avg, buf, grad_avg)


@register_rule
class Adagrad(Rule):
    """torch.optim.Adagrad: lr decay, L2 weight decay, initial accumulator value."""

    name = "adagrad"
    states = ("sum",)
    nonnegative_states = ("sum",)
    defaults = {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10}

    @classmethod
    def check(cls, hp):
        for key in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            _require(cls.name, hp[key] >= 0, f"{key} must be >= 0, got {hp[key]}")

    @classmethod
    def state_init(cls, hp):
        return {"sum": hp["initial_accumulator_value"]}

    @classmethod
    def coefficients(cls, hp, step):
        clr = hp["lr"] / (1.0 + (step - 1) * hp["lr_decay"])
        return (hp["weight_decay"], hp["eps"], -clr)

    @staticmethod
    def update(p, g, state, coef):
        (total,) = state
        l2, eps, neg_clr = coef
        g = g + l2 * p
        total = total + g * g
        p = p + neg_clr * ops.div(g, ops.sqrt(total) + eps)
        return p, (total,)


def _lerp_coefficients(weight: float) -> tuple[float, float, float]:
    """torch.lerp(start, end, weight) as fma(c, end - start, start * s + end * e) with exact 0/1
    factors s and e: torch's two branches, start + w (end - start) for |w| < 0.5 and
    end - (1 - w) (end - start) otherwise, each one fused multiply-add as torch computes it, with
    the weight rounded to fp32 first, as torch does with a scalar weight (w - 1 is then exact)."""
    w = float(torch.tensor(weight, dtype=torch.float32))
    return (1.0, 0.0, w) if abs(w) < 0.5 else (0.0, 1.0, w - 1.0)


@register_rule
class Muon(Rule):
    """Megatron's Muon (--optimizer muon: emerging_optimizers' OrthogonalizedOptimizer, whose
    names the hyperparameters keep), of which the epilogue runs the element-wise part: the momentum
    m <- lerp(m, g, 1 - momentum) and, with Nesterov, the direction lerp(g, m, momentum) into the
    step's workspace, each as torch.lerp computes it. The weight is left alone there: after the
    weight's pass, core/muon.py orthogonalizes the direction (Nesterov) or the momentum with
    Newton-Schulz and applies decoupled weight decay and the scaled update (`weight_step`)."""

    name = "muon"
    states = ("momentum_buffer", "direction")
    workspace_states = ("direction",)
    updates_weight = False
    weight_step = staticmethod(muon.orthogonalized_update)
    defaults = {"lr": 3e-4, "momentum": 0.95, "nesterov": False, "weight_decay": 0.01, "num_ns_steps": 5,
                "coefficient_type": "quintic", "scale_mode": "spectral", "extra_scale_factor": 1.0,
                "fp32_matmul_prec": "medium"}

    @classmethod
    def check(cls, hp):
        _require(cls.name, hp["lr"] >= 0, f"lr must be >= 0, got {hp['lr']}")
        _require(cls.name, 0 <= hp["momentum"] < 1, f"momentum must be in [0, 1), got {hp['momentum']}")
        _require(cls.name, hp["weight_decay"] >= 0, f"weight_decay must be >= 0, got {hp['weight_decay']}")
        _require(cls.name, float(hp["num_ns_steps"]).is_integer() and hp["num_ns_steps"] >= 1,
                 f"num_ns_steps must be an integer >= 1, got {hp['num_ns_steps']}")
        for key, choices in muon.CHOICES.items():
            _require(cls.name, hp[key] in choices, f"{key} must be one of {', '.join(choices)}, got {hp[key]!r}")

    @classmethod
    def stored_states(cls, hp):
        return cls.states if hp["nesterov"] else ("momentum_buffer",)

    @classmethod
    def coefficients(cls, hp, step):
        return (*_lerp_coefficients(1.0 - hp["momentum"]), *_lerp_coefficients(hp["momentum"]))

    @staticmethod
    def update(p, g, state, coef):
        m, _ = state
        m_keep, m_take, m_gain, d_keep, d_take, d_gain = coef
        m = ops.fma(m_gain, g - m, m_keep * m + m_take * g)  # lerp(m, g, 1 - momentum)
        direction = ops.fma(d_gain, m - g, d_keep * g + d_take * m)  # lerp(g, m, momentum)
        return p, (m, direction)
