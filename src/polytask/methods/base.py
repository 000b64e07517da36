"""The contract every multi-task method fulfils: from what it `needs`, a weight per task.

An MTL update over shared parameters θ is d = Σᵢ wᵢ ∇θ Lᵢ for almost every published method, so
a method is a map from the step's information (losses, Gramian G = J Jᵀ, Jacobian J or the
feature Gramian) to w. The engine then runs one ordinary backward of Σ wᵢ Lᵢ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.registry import Registry

Needs = Literal["losses", "gramian", "jacobian"]
NEEDS: tuple[str, ...] = ("losses", "gramian", "jacobian")
Compare = Literal["shared", "last_shared", "features"]
COMPARE: tuple[str, ...] = ("shared", "last_shared", "features")


def stream(seed: int, index: int) -> torch.Generator:
    """The generator of step ``index`` in the counter-based random stream ``seed``.

    Its seed is a SplitMix64 hash of (seed, index), so a step's draws depend on nothing but those
    two numbers: a checkpoint stores no generator state, a resumed run draws what the killed one
    would have, and every data-parallel rank draws the same.
    """
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed((x ^ (x >> 31)) >> 1)  # manual_seed takes a signed 64-bit value


class _StepStream:
    """``Step.generator``: ``stream(seed, index)``, built on first use (most methods draw nothing,
    and a generator costs a few microseconds a step, which a tiny model notices), unless given."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, step: Step | None, owner: type) -> torch.Generator | None:
        if step is None:
            return None  # the dataclass field's default
        generator = step.__dict__.get(self.slot)
        if generator is None:
            generator = step.__dict__[self.slot] = stream(step.seed, step.index)
        return generator

    def __set__(self, step: Step, generator: torch.Generator | None) -> None:
        step.__dict__[self.slot] = generator


class _StepGramian:
    """``Step.gramian``: the tensor given, or, where the engine deferred it (``Step.defer_gramian``),
    formed from J on first read. Why: a Jacobian method that never reads G (GradDrop, MoCo) would
    otherwise pay for it every step, a product over all of J (7% of a step on the benchmark MLP)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, step: Step | None, owner: type) -> Tensor | None:
        if step is None:
            return None  # the dataclass field's default
        state = step.__dict__
        value = state.get(self.slot)
        if value is None and "_gramian_source" in state:
            value = state[self.slot] = state.pop("_gramian_source")()
        return value

    def __set__(self, step: Step, value: Tensor | None) -> None:
        step.__dict__[self.slot] = value
        step.__dict__.pop("_gramian_source", None)
        step.__dict__.pop("_gramian_values", None)


@dataclass
class Step:
    """What a method sees at one training step (only the active tasks, in this order).

    Attributes:
        tasks: names of the tasks that have a loss this step.
        losses: detached loss values, shape (T,).
        index: the step counter of the engine that built the step (0-based).
        seed: the engine's seed; with ``index`` it fixes ``generator``.
        gramian: G = J Jᵀ (T×T) of the task gradients where the engine compares them (θ, the
            last shared layer or the shared representation), when ``needs`` is gramian or jacobian.
            For a Jacobian method the engine forms it on first read (see ``defer_gramian``).
        jacobian: J (T×P), the task gradients on θ flattened, when ``needs == "jacobian"``.
        epoch: current epoch (0-based), for methods whose schedule is in epochs.
        generator: the step's random stream, ``stream(seed, index)`` unless given.
        param_shapes: the shapes of the parameter tensors whose flattened gradients make J's
            columns, in order, when the engine hands J over (``needs == "jacobian"``); methods
            that work per parameter group (GradVac's ``group_type``, MetaBalance) split J by them.
            None for a hand-built step: J is then one group.
        part_gramians: the cross Gramians Gₐᵦ = Jₐ Jᵦᵀ (k×k×T×T) of the task Jacobians on k disjoint
            parts of the step's batch, for methods with ``batch_parts = k > 1`` (MoDo); J and G are
            then those of the mean loss over the parts (the whole batch). None otherwise.
        lookahead: for methods with ``lookahead = True`` (bilevel methods), ``lookahead(delta, weights)``
            gives the step's tasks' losses on an outer batch at the compared parameters displaced by
            ``delta`` (P,), and ∇ Σᵢ weightsᵢ Lᵢ^outer there (P,), or one gradient per row (K×P) for
            weights of shape (K, T), from one forward (K = 0: the losses only, no backward); the
            step's own losses are those of the inner batch. ``lookahead(delta, weights, batch="inner")``
            evaluates that inner batch instead, for methods that take several virtual steps on it
            (FORUM). It may be called any number of times. None otherwise.
    """

    tasks: tuple[str, ...]
    losses: Tensor
    index: int = 0
    seed: int = 0
    gramian: Tensor | None = _StepGramian()  # type: ignore[assignment]
    jacobian: Tensor | None = None
    epoch: int = 0
    generator: torch.Generator = _StepStream()  # type: ignore[assignment]
    param_shapes: tuple[torch.Size, ...] | None = None
    part_gramians: Tensor | None = None
    lookahead: Callable[..., tuple[Tensor, Tensor]] | None = None

    @classmethod
    def losses_only(cls, tasks: tuple[str, ...], losses: Tensor, index: int, seed: int, epoch: int) -> Step:
        """``Step(tasks=tasks, losses=losses, index=index, seed=seed, epoch=epoch)``, built without the
        dataclass's ``__init__`` (which passes every field, and two through their descriptors): the step
        of a loss-weighting method, made every step, where a small model's whole step is ~500 µs."""
        step = object.__new__(cls)
        step.__dict__.update(tasks=tasks, losses=losses, index=index, seed=seed, _gramian=None, jacobian=None,
                             epoch=epoch, _generator=None, param_shapes=None, part_gramians=None, lookahead=None)
        return step

    def defer_gramian(self, source: Callable[[], Tensor]) -> None:
        """Let ``gramian`` be ``source()``, called on its first read (and only then)."""
        self.__dict__["_gramian"] = None
        self.__dict__["_gramian_source"] = source

    def gramian_values(self) -> list[list[float]]:
        """G's entries as Python floats, row by row (exactly its values, of any dtype): what the
        few-task solvers compute on. Read from G once a step (and again if G is written to); the
        engine hands them over where it formed G on the host."""
        g = self.gramian
        if g is None:
            raise InvalidParameterError("the step has no task Gramian")
        kept = self.__dict__.get("_gramian_values")
        if kept is None or kept[0] is not g or kept[1] != g._version:
            kept = self.__dict__["_gramian_values"] = (g, g._version, g.detach().tolist())
        return kept[2]

    def give_gramian(self, gramian: Tensor, values: list[list[float]]) -> None:
        """Set ``gramian`` together with its entries as Python floats (``values == gramian.tolist()``)."""
        self.gramian = gramian
        self.__dict__["_gramian_values"] = (gramian, gramian._version, values)

    @property
    def has_generator(self) -> bool:
        """Whether the step was given a generator (or ``generator`` has been read, which makes one)."""
        return self.__dict__.get("_generator") is not None

    @property
    def has_gramian(self) -> bool:
        """Whether the step carries G, formed already or deferred (reading ``gramian`` would form it)."""
        return self.__dict__.get("_gramian") is not None or "_gramian_source" in self.__dict__

    @property
    def formed_gramian(self) -> Tensor | None:
        """G if it was given or has been read, else None (a deferred G is not formed by this)."""
        return self.__dict__.get("_gramian")


@dataclass(frozen=True)
class Update:
    """A method's answer for one step.

    Attributes:
        weights: wᵢ per active task, shape (T,): θ receives Σ wᵢ ∇Lᵢ unless ``direction`` is given;
            the heads receive wᵢ ∇Lᵢ (or ∇Lᵢ under the engine's ``heads="unweighted"``).
        direction: the update on the compared parameters, shape (P,), for methods that are not a
            weighting of this step's gradients (GradDrop, MoCo, GREAT).
        penalty: a differentiable scalar added to the total (uncertainty weighting's Σ ½ sᵢ).
    """

    weights: Tensor
    direction: Tensor | None = None
    penalty: Tensor | None = None


@dataclass(frozen=True)
class HostUpdate:
    """A loss-weighting method's update with its weights as constants (:meth:`Method.host_update`).

    Attributes:
        weights: wᵢ per active task, shape (T,), not requiring grad: a tensor of this step's own,
            which the method keeps no reference to and never writes (the engine seeds the losses'
            backward with it, and a loss that is a leaf, or a view of one, may take a row of it as
            its ``.grad``).
        gradients: (parameter, gradient) for each of the method's own parameters: the gradient of the
            step's total Σ wᵢ Lᵢ + penalty with respect to that parameter, the losses held constant.
            The engine adds each into its parameter's ``.grad`` through autograd (hooks fire as for
            any gradient).
        values: ``weights`` as Python floats (exactly its values, in its dtype), where the method has
            them; the engine then does not read them back. None: the engine reads ``weights``.
    """

    weights: Tensor
    gradients: tuple[tuple[Tensor, Tensor], ...] = ()
    values: Sequence[float] | None = None


class Method(nn.Module):
    """Base class of every weighting / gradient method.

    A method maps one :class:`Step` to one :class:`Update`: the engine calls ``method(step)``
    once per step. Subclasses set ``needs`` and implement :meth:`weights` (the common case: the
    update is Σ wᵢ ∇Lᵢ) or override :meth:`update` (a direction or a penalty as well). The base
    checks once that what ``needs`` asks for is in the step.

    Learnable weights (e.g. uncertainty log-variances) are ``nn.Parameter`` s of the method; the
    trainer hands them to the optimizer. Any other state lives in buffers or in ``state_dict``
    overrides keyed by task name, so that a resumed run continues exactly. Hyper-parameters are
    keyword-only and validated in ``__init__``.
    """

    needs: ClassVar[Needs] = "losses"
    #: where the engine compares the per-task gradients unless told otherwise: all shared
    #: parameters θ, the last shared layer (GradNorm, GREAT) or the shared representation
    #: (MGDA-UB). Irrelevant for ``needs == "losses"``.
    compare: ClassVar[Compare] = "shared"
    #: what ``heads="auto"`` gives this method's task-specific parameters, when the paper says
    #: (GradNorm's weights multiply the losses: weighted); None: decided by ``needs``
    heads: ClassVar[Literal["weighted", "unweighted"] | None] = None
    #: True when the weights depend on more than this step's inputs: on state kept between steps
    #: (buffers, parameters, the step counter, epochs) or on random draws. A one-shot
    #: ``polytask.backward`` refuses such methods: only a kept Engine gives them their history.
    stateful: ClassVar[bool] = False
    #: True for methods whose weights are not permuted along with the tasks (random task orders,
    #: as in PCGrad); the conformance suite skips the permutation check for them.
    permutation_equivariant: ClassVar[bool] = True
    #: values for the required hyper-parameters, used wherever a method must be built without a
    #: user (the conformance suites, the benchmarks); empty when every parameter has a default
    example_params: ClassVar[Mapping[str, Any]] = {}
    #: k > 1: the method needs the task gradients on k independent, disjoint parts of the step's
    #: batch (stochastic multi-objective methods such as MoDo). Each task's loss is then given to the
    #: engine as the k part losses stacked (the Trainer splits every batch in k), the step carries
    #: their cross Gramians ``part_gramians`` and the update applies to the mean loss. An instance
    #: may set it from a parameter.
    batch_parts: ClassVar[int] = 1
    #: True: a bilevel method that evaluates an outer batch at displaced parameters
    #: (``Step.lookahead``). The Trainer gives the engine half of each batch as the step's (inner)
    #: losses and a closure over the other half; a plain loop passes ``lookahead=`` to
    #: ``Engine.backward`` itself. An instance may set it from a parameter.
    lookahead: ClassVar[bool] = False
    #: True when the weights depend on nothing but the step's task names, dtype and device (equal
    #: weighting): the engine asks the method once per such key and reuses the answer, which on a
    #: small model saves a twentieth of a step. Never for weights that change during training.
    #: Not inherited: a subclass (one that records its calls, say) must declare it again.
    constant_weights: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "constant_weights" not in cls.__dict__:  # a promise about this class's own weights()
            cls.constant_weights = False

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        """Called once before training with all task names and, when known, their data sizes."""
        self.all_tasks = tuple(tasks)

    def weights_key(self, tasks: tuple[str, ...]) -> tuple[Any, ...] | None:
        """For a loss-weighting method whose weights change only now and then (DWA's, once an
        epoch): a tuple of plain values (numbers, strings) that changes whenever the weights of
        ``tasks`` may change; the engine then asks the method again only when it changes (or the
        dtype or device does) and reuses its last answer meanwhile. None (the default): asked
        every step. Only for weights that depend on nothing else (not on the step's losses,
        index or generator) and for a method without a penalty or per-step state."""
        return None

    def host_update(self, step: Step) -> HostUpdate | None:
        """For a loss-weighting method whose weights learn (or that adds a penalty): the step's update
        with the weights as constants and the gradients of the total on the method's own parameters
        written out, so that the engine's backward needs no node for them. The engine takes it instead
        of ``update`` where the method is its own (not wrapped), unpatched and declares it in a class
        that also gives its ``weights``/``update``/``forward`` (or a subclass of that); ``update`` stays
        the differentiable form, which wrappers (``warmup``) and hand-written loops compose. None (the
        default): ``update`` is used."""
        return None

    @property
    def is_set_up(self) -> bool:
        return getattr(self, "all_tasks", None) is not None

    def forward(self, step: Step) -> Update:
        """The step's update; checks that the step carries what ``needs`` asks for."""
        if self.needs != "losses" and not step.has_gramian:
            raise InvalidParameterError(f"`{type(self).__name__}` needs the task Gramian (needs = {self.needs!r}); "
                                        "the step has none")
        if self.needs == "jacobian" and step.jacobian is None:
            raise InvalidParameterError(f"`{type(self).__name__}` needs the task Jacobian on θ; the step has none")
        return self.update(step)

    def update(self, step: Step) -> Update:
        """Default: the update is the weighting ``self.weights(step)`` (each registered method
        defines one of the two; ``register`` checks)."""
        return Update(self.weights(step))  # type: ignore[attr-defined]

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float],
                     val_metrics: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Hook for methods that adapt once per epoch (DWA, task prioritisation)."""

    def extra_repr(self) -> str:
        params = getattr(self, "_hparams", {})
        return ", ".join(f"{k}={v!r}" for k, v in params.items())

    def _remember(self, **hparams: Any) -> None:
        """Record hyper-parameters for ``repr``."""
        self._hparams = hparams


METHODS: Registry[Method] = Registry("method")


def register(name: str):
    """Class decorator: add a Method subclass to the registry under ``name``."""
    def decorate(cls: type[Method]) -> type[Method]:
        if cls.needs not in NEEDS:
            raise InvalidParameterError(f"{cls.__name__}.needs must be one of {NEEDS}; found {cls.needs!r}")
        if cls.update is Method.update and not callable(getattr(cls, "weights", None)):
            raise InvalidParameterError(f"{cls.__name__} must define weights(step) or update(step)")
        if cls.compare not in COMPARE:
            raise InvalidParameterError(f"{cls.__name__}.compare must be one of {COMPARE}; found {cls.compare!r}")
        return METHODS.register(name)(cls)  # type: ignore[return-value]
    return decorate


def example_method(name: str) -> Method:
    """The registered method ``name`` built with its ``example_params``."""
    return METHODS.create(name, **METHODS.get(name).example_params)


def get_method(method: str | Method, **params: Any) -> Method:
    """A method object from a registry name (with parameters) or an instance."""
    if isinstance(method, Method):
        if params:
            raise InvalidParameterError("parameters can only be given with a method name, not an instance")
        return method
    if not isinstance(method, str):
        raise InvalidParameterError(f"method must be a registry name or a Method; found {type(method).__name__}")
    return METHODS.create(method, **params)


def check_positive(owner: str, name: str, value: float, *, allow_zero: bool = False) -> float:
    """Validate a numeric hyper-parameter (`name` of `owner` must be > 0 / >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidParameterError(f"`{name}` of `{owner}` must be {bound}; found {value!r}")
    return float(value)
