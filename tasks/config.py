"""The one typed configuration: ``params.yaml`` parsed into a frozen, validated object.

Every stage reads its own section from :class:`Params`; nothing else indexes raw dicts.
Unknown keys, wrong types and out-of-range values are refused with a one-line
:class:`ConfigError` that names the offending key.
"""

from __future__ import annotations

import copy
import re
from collections import abc
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from shrinkflow.models import ARCHITECTURES, STRATEGIES
from shrinkflow.models.allocation import RANKS_BY, Objective
from shrinkflow.models.arch import OPTIONS
from shrinkflow.models.arch.given import GivenOptions
from shrinkflow.models.architecture import ArchOptions
from shrinkflow.models.preprocess import InputOptions
from shrinkflow.models.strategies.base import Strategy
from shrinkflow.models.strategies.lowrank import LowRankOptions
from shrinkflow.models.strategies.structured import BUDGET_SHAPES, StructuredOptions
from shrinkflow.tasks.errors import ShrinkflowError

MAX_IMAGE_SIZE = 1024  # pixels per side after resizing (data.image_size)


class ConfigError(ShrinkflowError, ValueError):
    """A params file or override that cannot be turned into :class:`Params`."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(gt=0, lt=1)]


class DataConfig(_Section):
    """Where the images come from and how they are shaped; ``augment`` is read by training."""

    source: Literal["digits", "imagefolder", "mnist", "fashion_mnist", "cifar10"] = "digits"
    root: Annotated[str, Field(min_length=1)] = "data/raw"  # relative to the project; digits ignores it
    download: bool = False  # torchvision sources only: fetch into `root` when the files are missing
    # None: keep the source's own size. At most 1024: one 3-channel image is then 3 MB of uint8
    # and a batch of 64 float32 activations already over 800 MB (a typo asked torch for 72 TB).
    image_size: Annotated[int, Field(ge=4, le=MAX_IMAGE_SIZE)] | None = None
    channels: Literal[1, 3] | None = None  # None: the source's own (1 if every image is grayscale)
    # Validation is two disjoint parts: `val` picks each model's epoch and steers ratio searches;
    # `gate` only certifies promotion (nothing is ever chosen on it).
    val_fraction: Fraction = 0.1
    gate_fraction: Fraction = 0.3
    test_fraction: Fraction = 0.2  # ignored when the source has its own test split
    max_train_samples: Annotated[int, Field(ge=1)] | None = None  # a stratified subset of train
    augment: Literal["none", "crop", "crop_flip"] = "none"  # random crop with padding [+ h-flip]
    # How images reach image_size: stretch to the square, or shorter side then the centre square
    # (set from model.input for a model brought from outside).
    resize: Literal["stretch", "center_crop"] = "stretch"
    # Images a model brought from outside has never seen (an image folder of the same classes);
    # val, gate and test are drawn from these alone. Default: the source's own test split.
    heldout_root: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.gate_fraction + self.test_fraction >= 0.9:
            raise ValueError("data.val_fraction + gate_fraction + test_fraction must stay below 0.9")
        if self.download and self.source not in ("mnist", "fashion_mnist", "cifar10"):
            raise ValueError(f"data.download applies to torchvision sources only, not {self.source}")
        if self.heldout_root and self.source != "imagefolder":
            raise ValueError("data.heldout_root applies to data.source imagefolder")
        return self


class RegisteredOptions(ArchOptions):
    """A version this pipeline registered, e.g. ``models:/shrinkflow-digits@champion`` or
    ``models:/shrinkflow-digits/3``, taken as the baseline with the network and weights it has."""

    arch: Literal["registered"] = "registered"
    uri: Annotated[str, Field(pattern=r"^models:/[^/@]+(@[A-Za-z][A-Za-z0-9_-]*|/[0-9]+)$")]
    input: InputOptions = InputOptions()
    classes: tuple[str, ...] | None = None
    finetune: Annotated[int, Field(ge=0)] = 0

    def arch_options(self) -> dict[str, Any]:
        return {"arch": "registered", "uri": self.uri}


# The `model` section: one options model per architecture (each declared beside its network in
# models/arch/), or a registered version, told apart by `arch`. A key it does not read is refused.
ModelConfig = Annotated[
    Union[(*OPTIONS.values(), RegisteredOptions)],  # noqa: UP007
    Field(discriminator="arch"),
]


def comes_trained(model: ArchOptions) -> bool:
    """Whether the model section brings trained weights (a file, or a registered version)."""
    return isinstance(model, RegisteredOptions) or (
        isinstance(model, GivenOptions) and model.weights is not None
    )


def _given_input(raw: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the image geometry a brought model declares (``model.input``): the model's
    preprocessing decides, and a data key that contradicts it is refused."""
    model, data = raw.get("model"), raw.get("data") or {}
    if not isinstance(model, dict) or model.get("arch") not in ("torchvision", "factory", "registered"):
        return raw
    if not isinstance(data, dict):
        return raw
    try:
        values = InputOptions.model_validate(model.get("input") or {}).resolved()
    except ValidationError:
        return raw  # reported with its key by the model section's own validation
    data = dict(data)
    if model.get("arch") == "torchvision" and values["channels"] is None:
        values["channels"] = 3  # torchvision's stems take RGB
    for key, value in (
        ("image_size", values["size"]),
        ("channels", values["channels"]),
        ("resize", values["resize"]),
    ):
        if value is None:
            continue
        if (
            data.get(key) is not None
            and data[key] != value
            and not (key == "resize" and data[key] == "stretch")
        ):
            raise ValueError(
                f"data.{key} {data[key]!r} contradicts model.input ({value!r}); the model's input decides, "
                f"so drop data.{key}"
            )
        data[key] = value
    return {**raw, "data": data}


class TrainConfig(_Section):
    epochs: Annotated[int, Field(ge=1)] = 30
    batch_size: Annotated[int, Field(ge=1)] = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    # Which epoch's weights a model keeps: the last (where the schedule converges), or the one
    # with the best validation accuracy (on a small validation split that rewards noise spikes).
    keep: Literal["last", "best"] = "last"
    # Where training and evaluation run; data stays in CPU memory and checkpoints are saved from
    # CPU tensors either way. auto: cuda when torch sees a GPU, else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The training step's arithmetic: auto is bf16 autocast where the hardware computes bf16
    # natively (CPUs with AVX512-BF16/AMX, most GPUs), fp16 with a gradient scaler on other GPUs,
    # else fp32. Weights, validation, checkpoints and latency stay float32 whatever this says.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None  # None: for networks with convolutions
    # L1 weight regularisation: l1 * sum |w| over conv and linear weights, added to the loss.
    l1: Annotated[float, Field(ge=0)] = 0.0

    @field_validator("device")
    @classmethod
    def _device_present(cls, device: str) -> str:
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("cuda was requested but torch sees no CUDA device; use auto or cpu")
        return device


class DistillConfig(_Section):
    """Hinton distillation from the baseline: ``alpha * T^2 * KL(student_T || teacher_T) +
    (1 - alpha) * cross-entropy``."""

    temperature: Annotated[float, Field(gt=0)] = 4.0
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.7


class SearchConfig(_Section):
    """Search the ratio for the largest reduction within ``promote.tolerance``: ``step`` tries
    ``low, low + step, ...`` up to ``high`` and stops at the first failure; ``bisect`` tries
    ``low``, then ``high``, then halves the interval between the last pass and the first fail."""

    mode: Literal["step", "bisect"] = "bisect"
    low: Fraction = 0.25
    high: Fraction = 0.9
    step: Fraction = 0.125
    trials: Annotated[int, Field(ge=1, le=20)] = 4

    @model_validator(mode="after")
    def _ordered(self) -> SearchConfig:
        if self.low >= self.high:
            raise ValueError("search.low must be below search.high")
        return self


class LowRankStep(LowRankOptions):
    """The ``lowrank`` step of a candidate whose strategy is another: after the strategy (after
    pruning) and before fine-tuning, each layer is factorised at the rank ``ratio``, ``energy`` or
    ``ranks`` give (the lowrank strategy's own options), or (``allocate: true``, beside a
    ``budget`` with ``allocation: sensitivity``) at the rank the budget's allocation chooses
    together with the widths."""

    allocate: bool = False

    @model_validator(mode="after")
    def _one_way(self) -> LowRankStep:
        given = [k for k in ("ratio", "energy", "ranks") if getattr(self, k) is not None]
        if len(given) + self.allocate != 1:
            raise ValueError("give one of ratio, energy, ranks and allocate: true")
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments for the lowrank strategy (none for ``allocate``: the allocation's ranks)."""
        return {k: v for k in ("ratio", "energy", "ranks") if (v := getattr(self, k)) is not None}


class _Candidate(_Section):
    """Fields every candidate has, around its strategy's own options (each strategy declares those
    beside itself, in models/strategies/). Any trainable candidate may factorise after its
    strategy with a ``lowrank`` step, fine-tune with ``distill`` and end with ``quantize: int8``
    (prune -> lowrank -> distill -> int8); a ratio strategy takes a fixed ``ratio`` or a
    ``search`` for the largest one that passes the gate."""

    strategy: str
    epochs: Annotated[int, Field(ge=1)] | None = None
    lr: Annotated[float, Field(gt=0)] | None = None
    distill: DistillConfig | None = None
    quantize: Literal["int8"] | None = None
    search: SearchConfig | None = None
    l1: Annotated[float, Field(ge=0)] | None = None  # None: train.l1
    # Iterative pruning: reach the ratio in this many rounds, fine-tuning between them; the
    # candidate's epochs are split across the rounds (the budget stays the same).
    rounds: Annotated[int, Field(ge=1, le=10)] = 1
    lowrank: LowRankStep | None = None  # factorised after the strategy (the last round's)

    @property
    def _strategy(self) -> Strategy:
        return STRATEGIES[self.strategy]

    @model_validator(mode="after")
    def _fits_the_strategy(self) -> _Candidate:
        if not self._strategy.trains:
            stray = sorted(
                self.model_fields_set & {"epochs", "lr", "distill", "quantize", "search", "lowrank"}
            )
            if stray:
                raise ValueError(
                    f"{self.strategy} is a final post-training step, so {stray[0]!r} does not apply"
                )
        budget = getattr(self, "budget", None)
        if budget is not None:
            unset = sum(b.keep is None for b in self.budgets)
            if isinstance(budget, tuple) and (unset != (self.search is not None)):
                raise ValueError(
                    f"{self.strategy}: give every budget a keep, or (with search) leave keep out of "
                    "exactly one: the one the search varies"
                )
            if not isinstance(budget, tuple) and (budget.keep is None) == (self.search is None):
                raise ValueError(f"{self.strategy}: set exactly one of budget.keep and search")
            if self.rounds > 1:
                raise ValueError(f"{self.strategy}: a budget is allocated in one round; rounds must be 1")
        elif "ratio" in self._strategy.options.model_fields:
            alternatives = self._strategy.options.RATIO_ALTERNATIVES
            if sum(getattr(self, k) is not None for k in ("ratio", *alternatives, "search")) != 1:
                budgets = ("budget",) if "budget" in self._strategy.options.model_fields else ()
                choices = ", ".join(("ratio", *alternatives, *budgets))
                raise ValueError(f"{self.strategy}: set exactly one of {choices} and search")
        elif self.search is not None:
            raise ValueError(f"{self.strategy} has no ratio to search")
        limit = getattr(self, "max_layer_ratio", None)
        if self.search and not budget and getattr(self, "global_pruning", False) and self.search.high > limit:
            raise ValueError(
                f"search.high {self.search.high} is above max_layer_ratio {limit}: global pruning "
                "cannot remove more than that from any layer; lower high or raise max_layer_ratio"
            )
        if self.rounds > 1 and not issubclass(self._strategy.options, StructuredOptions):
            raise ValueError(
                f"{self.strategy} cannot prune in rounds; only the structured pruners can "
                "(prune_l1, prune_taylor, prune_fpgm, slim)"
            )
        return self

    @model_validator(mode="after")
    def _lowrank_step_fits(self) -> _Candidate:
        if self.lowrank is None:
            return self
        if self.strategy == "lowrank":
            raise ValueError(
                "lowrank: a lowrank candidate factorises already; the step follows another strategy"
            )
        if self.lowrank.allocate and (
            getattr(self, "budget", None) is None or getattr(self, "allocation", None) not in RANKS_BY
        ):
            raise ValueError(
                f"lowrank.allocate: ranks are allocated with the widths, so give a budget with allocation: "
                f"{' or '.join(RANKS_BY)}"
            )
        return self

    @property
    def allocates_ranks(self) -> bool:
        """Whether the budget's allocation chooses ranks beside the widths."""
        return self.lowrank is not None and self.lowrank.allocate

    def options(self) -> dict[str, Any]:
        """Keyword arguments for the strategy (its own options, less those of a pre-phase)."""
        own = self._strategy.options
        return {k: getattr(self, k) for k in own.model_fields if k not in own.PHASE_KEYS}

    def steps(self) -> list[str]:
        """The composed steps, in order, e.g. ``["prune_l1", "lowrank", "distill", "int8"]``."""
        return [
            self.strategy,
            *(["lowrank"] if self.lowrank else []),
            *(["distill"] if self.distill else []),
            *([self.quantize] if self.quantize else []),
        ]

    def composition(self) -> str:
        """The steps joined by ``+``, e.g. ``prune_l1+lowrank+distill+int8``: what the model is made of."""
        return "+".join(self.steps())

    def exclusive(self) -> bool:
        """Whether a step must have its process to itself (see ``Strategy.exclusive``)."""
        return any(STRATEGIES[step].exclusive for step in self.steps() if step in STRATEGIES)


def _candidate_model(strategy: Strategy) -> type[_Candidate]:
    """The config entry of a candidate using ``strategy``: the common fields plus its options."""
    return create_model(
        f"{strategy.name}_candidate",
        __base__=(_Candidate, strategy.options),
        __doc__=(strategy.shrink.__doc__ or "").strip(),
        strategy=(Literal[strategy.name], ...),
    )


_CANDIDATE_MODELS = tuple(_candidate_model(s) for s in STRATEGIES.values())
# Importable by name, so a pickled config (a process or Dask worker's) refers to these very classes
# instead of carrying copies that the union's serializer does not recognise (one warning each).
globals().update({model.__name__: model for model in _CANDIDATE_MODELS})
CandidateConfig = Annotated[
    Union[_CANDIDATE_MODELS],  # noqa: UP007 - built at run time
    Field(discriminator="strategy"),
]


# The strategies a ladder's rungs may use: those whose candidates take a budget.
LADDER_STRATEGIES = tuple(n for n, s in STRATEGIES.items() if "budget" in s.options.model_fields)
CANDIDATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class LadderConfig(_Section):
    """Budget candidates with nothing to write but their budgets: each rung (``name: {objective:
    keep, ...}``, e.g. ``ladder-10: {params: 0.1, latency_ms: 0.4}``) is a candidate of that name
    that prunes with ``strategy`` to widths allocated by measured sensitivity for every budget at
    once, with the ranks of its factorised layers allocated together with the widths
    (``lowrank``), fine-tuned for ``epochs`` at ``lr`` and distilled from the baseline
    (``distill``; null: plain fine-tuning). Rungs are tested like any candidate, largest first."""

    strategy: Literal[LADDER_STRATEGIES] = "prune_l1"  # type: ignore[valid-type]
    lr: Annotated[float, Field(gt=0)] | None = 0.01
    epochs: Annotated[int, Field(ge=1)] | None = None  # None: shrink.epochs
    distill: DistillConfig | None = DistillConfig()
    lowrank: bool = True
    rungs: dict[str, Annotated[dict[Objective, Fraction], Field(min_length=1)]]

    def candidates(self) -> dict[str, dict[str, Any]]:
        """Each rung as a candidate's entry in ``shrink.candidates``, by its name."""
        common = {
            "strategy": self.strategy,
            "lr": self.lr,
            "epochs": self.epochs,
            "distill": self.distill and self.distill.model_dump(),
            "allocation": "sensitivity",
            "lowrank": {"allocate": True} if self.lowrank else None,
        }
        return {
            name: common | {"budget": [{"objective": o, "keep": k} for o, k in rung.items()]}
            for name, rung in self.rungs.items()
        }


class ShrinkConfig(_Section):
    workers: Annotated[int, Field(ge=1)] = 2  # candidates trained at once
    # Where the fan-out runs: Prefect's thread pool, its process pool, or a Dask cluster
    # (`dask_address` of a running scheduler, or a local cluster of `workers` processes).
    runner: Literal["thread", "process", "dask"] = "thread"
    dask_address: str | None = None
    epochs: Annotated[int, Field(ge=1)] = 20
    lr: Annotated[float, Field(gt=0)] | None = None
    calibration_size: Annotated[int, Field(ge=1)] = 256
    ladder: LadderConfig | None = None  # budget candidates generated from rungs
    candidates: dict[str, CandidateConfig] = {}  # the declared ones, and the ladder's rungs

    @model_validator(mode="before")
    @classmethod
    def _rungs_are_candidates(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or not isinstance(raw.get("ladder"), dict):
            return raw
        try:
            ladder = LadderConfig.model_validate(raw["ladder"])
        except ValidationError:
            return raw  # reported with its key by the ladder's own validation
        declared = raw.get("candidates") or {}
        if isinstance(declared, dict) and (both := next((n for n in ladder.rungs if n in declared), None)):
            raise ValueError(f"ladder rung {both!r} has the name of a declared candidate; rename one")
        return raw | {
            "candidates": declared | ladder.candidates() if isinstance(declared, dict) else declared
        }

    @model_validator(mode="after")
    def _valid_names(self) -> ShrinkConfig:
        if not self.candidates:
            raise ValueError(
                "shrink.candidates is empty; declare at least one candidate or a shrink.ladder rung"
            )
        for name, cand in self.candidates.items():
            if cand.rounds > (cand.epochs or self.epochs):
                raise ValueError(
                    f"candidate {name!r}: rounds {cand.rounds} need at least one epoch each "
                    f"(its budget is {cand.epochs or self.epochs})"
                )
        for name in self.candidates:
            # No dots: DVC reads `shrink.candidates.<name>` as a dotted key path.
            if name == "baseline" or not CANDIDATE_NAME.fullmatch(name):
                raise ValueError(
                    f"candidate name {name!r} must be letters, digits, '-' or '_' and not 'baseline'"
                )
        return self

    @model_validator(mode="after")
    def _one_table_per_strategy(self) -> ShrinkConfig:
        # The sensitivity stage measures one table per strategy for every budget candidate.
        ratios: dict[str, tuple[str, tuple[float, ...]]] = {}
        for name, cand in self.candidates.items():
            if getattr(cand, "budget", None) is None:
                continue
            first, seen = ratios.setdefault(cand.strategy, (name, cand.sensitivity_ratios))
            if seen != cand.sensitivity_ratios:
                raise ValueError(
                    f"candidates {first!r} and {name!r} allocate {cand.strategy} from different "
                    "sensitivity_ratios; one table is measured per strategy, so give them the same"
                )
        return self

    def sensitivity_tables(self) -> dict[str, tuple[float, ...]]:
        """The sensitivity tables the budget candidates allocate from: strategy -> its ratios."""
        return {
            cand.strategy: cand.sensitivity_ratios
            for cand in self.candidates.values()
            if getattr(cand, "budget", None) is not None
        }

    def ranked_tables(self) -> set[str]:
        """The strategies whose tables also measure each factorisable layer's ranks: those of the
        budget candidates that allocate ranks."""
        return {cand.strategy for cand in self.candidates.values() if cand.allocates_ranks}


# The image size each built-in source has before any resize (imagefolder's is known only later).
SOURCE_IMAGE_SIZES = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32}
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,254}")


def registrable_model_name(name: str) -> str:
    """A registered-model name MLflow accepts and a ``models:/<name>@<alias>`` URI can carry."""
    bad = sorted({c for c in name if c in "/:@" or not c.isprintable()})
    if bad or name != name.strip():
        shown = ", ".join(repr(c) for c in bad) or "leading or trailing spaces"
        raise ValueError(f"a registered model name cannot contain {shown}")
    if name == "." or name.startswith(".."):
        raise ValueError("a registered model name cannot be '.' or start with '..'")
    return name


def settable_alias(alias: str) -> str:
    """An alias MLflow lets a version carry: ``latest`` and ``v<digits>`` are reserved by MLflow
    (``models:/<name>@latest`` and ``/v3`` mean something else)."""
    if not _ALIAS.fullmatch(alias):
        raise ValueError("an alias is a letter, then letters, digits, '_' or '-' (at most 255)")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"{alias!r} is reserved by MLflow (latest, v<number>); choose another alias")
    return alias


class PromoteConfig(_Section):
    """Which model wins a run, and what the registry does with it (see tasks/decision/gate.py)."""

    tolerance: Annotated[float, Field(ge=0)] = 2.0
    tolerance_mode: Literal["absolute", "relative"] = "absolute"
    # One-sided confidence of the non-inferiority gate; null: the point rule (observed drop
    # within tolerance), with no statistical guarantee.
    confidence: Annotated[float, Field(gt=0.5, lt=1)] | None = 0.95
    # Planning assumption for "what can the gate split certify": the share of gate images on which
    # a model as accurate as the baseline disagrees with it.
    planning_disagreement: Annotated[float, Field(gt=0, lt=1)] = 0.05
    # The per-class guard: a model that loses more than this many points on any single class of
    # the gate split (against the baseline) is not eligible, whatever its overall accuracy; null:
    # no guard. 10 on the default digits gate (about 54 images a class, 1.85 points each): a model
    # as accurate as the baseline is refused in under 1% of runs, one that loses 15 points on a
    # class in 80% (README, "The per-class guard").
    max_class_drop: Annotated[float, Field(ge=0, le=100)] | None = 10.0
    # How the gate certifies the decision as a whole (tasks/decision/decide.py): fixed_sequence tests one
    # recipe per size level, largest first, and stops at the first failure; holm adjusts the same
    # family; none tests every candidate on its own (no family-wise guarantee).
    multiplicity: Literal["fixed_sequence", "holm", "none"] = "fixed_sequence"
    objective: Literal["params", "flops", "size_bytes", "latency_ms"] = "params"
    model_name: Annotated[str, Field(min_length=1)] = "shrinkflow-digits"  # default: shrinkflow-<data.source>
    alias: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")] = "champion"
    challenger_alias: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")] = "challenger"
    # Against the current champion, re-measured on the current test data:
    champion_tolerance: Annotated[float, Field(ge=0)] = 2.0  # test points a smaller model may lose
    comparable_size: Annotated[float, Field(ge=0)] = 0.05  # relative size band that counts as "the same"

    @model_validator(mode="after")
    def _distinct_aliases(self) -> PromoteConfig:
        if self.alias == self.challenger_alias:
            raise ValueError("promote.alias and promote.challenger_alias must differ")
        return self

    # Registry syntax, checked here rather than by MLflow after training (issue #13).
    @field_validator("model_name")
    @classmethod
    def _registrable_name(cls, name: str | None) -> str | None:
        return name if name is None else registrable_model_name(name)  # None: a derived default

    @field_validator("alias", "challenger_alias")
    @classmethod
    def _settable_alias(cls, alias: str) -> str:
        return settable_alias(alias)

    @model_validator(mode="after")
    def _holm_needs_p_values(self) -> PromoteConfig:
        if self.multiplicity == "holm" and self.confidence is None:
            raise ValueError(
                "promote.multiplicity holm adjusts p-values, which the point rule (confidence: null) has "
                "none of: set a confidence, or multiplicity fixed_sequence or none"
            )
        return self

    @model_validator(mode="after")
    def _relative_tolerance_is_a_percentage(self) -> PromoteConfig:
        if self.tolerance_mode == "relative" and self.tolerance > 100:
            raise ValueError(
                "tolerance is a percentage of the baseline's accuracy when tolerance_mode is relative, "
                f"so at most 100 (got {self.tolerance})"
            )
        return self


class EvaluateConfig(_Section):
    latency_warmup: Annotated[int, Field(ge=0)] = 10
    latency_repeats: Annotated[int, Field(ge=1)] = 50


class TrackingConfig(_Section):
    experiment: Annotated[str, Field(min_length=1)] = "shrinkflow"
    tensorboard: bool = False  # also write TensorBoard event files to runs/


class PathsConfig(_Section):
    """Where every stage reads and writes; ``dvc.yaml`` interpolates the same keys."""

    prepared: str = "data/prepared"
    baseline: str = "artifacts/baseline"
    sensitivity: str = "artifacts/sensitivity"  # the tables budget candidates allocate from
    candidates: str = "artifacts/candidates"
    reports: str = "reports"
    # Outputs stay inside the project unless this opts in (stages delete stale files they own).
    outside_project: bool = False

    @model_validator(mode="after")
    def _inside_the_project(self) -> PathsConfig:
        keys = ("prepared", "baseline", "sensitivity", "candidates", "reports")
        named = {k: getattr(self, k) for k in keys}
        for key, value in named.items():
            parts = Path(value).parts
            if not value.strip() or Path(value) == Path("."):
                raise ValueError(f"paths.{key} must name a directory below the project, not {value!r}")
            if (Path(value).is_absolute() or ".." in parts) and not self.outside_project:
                raise ValueError(
                    f"paths.{key} {value!r} leaves the project; use a relative path below it, or set "
                    "paths.outside_project: true"
                )
        if len({Path(v) for v in named.values()}) < len(named):
            raise ValueError("paths.prepared, baseline, sensitivity, candidates and reports must all differ")
        return self


SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit


class Params(_Section):
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = OPTIONS["basenet"]()
    train: TrainConfig = TrainConfig()
    shrink: ShrinkConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    tracking: TrackingConfig = TrackingConfig()
    paths: PathsConfig = PathsConfig()

    @model_validator(mode="before")
    @classmethod
    def _defaults_that_depend_on_other_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "arch" not in raw["model"]:
            raw = {**raw, "model": {"arch": "basenet", **raw["model"]}}  # the union needs its tag
        # A registered model is one task: by default it is named after the data it classifies.
        if isinstance(raw, dict) and isinstance(raw.get("promote", {}), dict):
            promote = raw.get("promote") or {}
            if "model_name" not in promote:
                data = raw.get("data")
                source = data.get("source", "digits") if isinstance(data, dict) else "digits"
                raw = {**raw, "promote": {**promote, "model_name": f"shrinkflow-{source}"}}
        if isinstance(raw, dict):
            raw = _given_input(raw)
        return raw

    @property
    def arch_class(self) -> type:
        """The architecture the baseline will have (a registered version: a network rebuilt from
        its checkpoint, judged like any model brought from outside)."""
        return ARCHITECTURES["factory" if self.model.arch == "registered" else self.model.arch]

    def composition(self, name: str) -> str:
        """What model ``name`` is made of: a candidate's steps (``prune_l1+distill+int8``); the
        baseline is ``baseline``, or the kind of model brought from outside (``torchvision``,
        ``factory``, ``registered``)."""
        if name != "baseline":
            return self.shrink.candidates[name].composition()
        return self.model.arch if comes_trained(self.model) else "baseline"

    def arch_options(self) -> dict[str, Any]:
        options = self.model.arch_options()
        return {**options, "arch": self.arch_class.ARCH}

    @model_validator(mode="after")
    def _weights_or_training(self) -> Params:
        classes = getattr(self.model, "classes", None)
        if classes is not None and len(set(classes)) != len(classes):
            raise ValueError("model.classes names a class twice")
        if isinstance(self.model, GivenOptions) and self.model.weights is None and self.model.finetune:
            raise ValueError(
                "model.finetune applies to a model with weights; without, train.epochs trains it"
            )
        return self

    @model_validator(mode="after")
    def _strategies_fit_the_arch(self) -> Params:
        # Refused here, before any training, rather than when the candidate's turn comes.
        for name, cand in self.shrink.candidates.items():
            for step in cand.steps():
                why = STRATEGIES[step].refusal(self.arch_options()) if step in STRATEGIES else None
                if why:
                    raise ValueError(f"shrink.candidates.{name}: {step} on {self.model.arch} {why}")
        return self

    @model_validator(mode="after")
    def _arch_fits_the_input(self) -> Params:
        size = self.data.image_size or SOURCE_IMAGE_SIZES.get(self.data.source)
        options = self.arch_options()
        need = self.arch_class.min_image_size(options)
        if size and size < need:
            key = "data.image_size" if self.data.image_size else f"data.source {self.data.source}"
            raise ValueError(
                f"model: {self.model.arch} {_shape(options)} needs images of at least {need}x{need}, "
                f"but {key} gives {size}x{size}"
            )
        return self


def _shape(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items() if k != "arch")


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read ``path``, apply ``key.sub=value`` overrides (values parsed as YAML) and validate."""
    path = Path(path)
    text = _read_params_text(path)
    if len(text) > MAX_PARAMS_CHARS:
        raise ConfigError(
            f"{path}: {len(text)} characters; a params file may have at most {MAX_PARAMS_CHARS}"
        )
    try:
        raw = _strict_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        raw = apply_override(raw, item)
    return parse_params(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b.c=value`` set; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {_quoted(item)} must look like key.sub=value")
    if len(value) > MAX_OVERRIDE_CHARS:
        raise ConfigError(
            f"override {_quoted(item)}: the value has {len(value)} characters; at most {MAX_OVERRIDE_CHARS}"
        )
    raw = copy.deepcopy(raw)
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {_quoted(item)}: {_quoted(part)} is not a section")
    try:
        node[leaf] = _strict_yaml(value)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {_quoted(item)}: the value is not valid YAML: {_yaml_problem(exc)}"
        ) from None
    return raw


def _read_params_text(path: Path) -> str:
    """The params file as text, or one line saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"params file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"params file {path} is a directory; pass a YAML file with -p") from None
    except PermissionError:
        raise ConfigError(f"params file {path} is not readable (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"params file {path} is not UTF-8 text (byte {exc.start}); is it binary?") from None
    except OSError as exc:
        raise ConfigError(f"params file {path} cannot be read: {exc.strerror or exc}") from None


MAX_PARAMS_CHARS = 1_000_000  # a params file is a page of YAML; this is a thousand of them
MAX_OVERRIDE_CHARS = 10_000
MAX_YAML_DEPTH = 32  # params nest four levels deep; PyYAML's recursion fails near a thousand
MAX_YAML_NODES = 100_000  # nodes after alias expansion: a "billion laughs" stops here
QUOTED_CHARS = 60  # of a bad value in an error message


def _quoted(value: object) -> str:
    """``value`` for an error message: repr'd, and cut to a short prefix."""
    text = repr(value)
    return text if len(text) <= QUOTED_CHARS else f"{text[:QUOTED_CHARS]}... ({len(text)} characters)"


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last),
    nesting deeper than :data:`MAX_YAML_DEPTH` and more than :data:`MAX_YAML_NODES` nodes once
    aliases are expanded."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        # Aliases share nodes, so the document itself stays small; what later copies it whole
        # (validation, error messages) would not. Count the nodes as if every alias were expanded.
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"more than {MAX_YAML_NODES} values once aliases are expanded", node.start_mark
            )
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, abc.Hashable):
                continue  # PyYAML itself refuses an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {_quoted(key)} (YAML keeps only the last)",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes under ``node`` with aliases expanded (a node that contains itself counts as too many)."""
    if (known := memo.get(id(node))) is not None:
        return known
    memo[id(node)] = MAX_YAML_NODES + 1  # until finished: a cycle back to here is unbounded
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, memo)
        if total > MAX_YAML_NODES:
            break
    memo[id(node)] = total
    return total


def _strict_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    return f"YAML syntax error{where}: {str(getattr(exc, 'problem', None) or exc)[:200]}"


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


UNION_TAGS = frozenset(BUDGET_SHAPES)


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = list(err["loc"])
    if loc[:2] == ["shrink", "candidates"] and len(loc) > 3:
        del loc[3]  # pydantic inserts the strategy tag of the discriminated union
        loc = loc[:4] + [p for p in loc[4:] if p not in UNION_TAGS]  # ... and a budget's shape
    if loc[:1] == ["model"] and len(loc) > 2:
        del loc[1]  # ... and the architecture's
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a cross-section check names its own keys
        return msg
    if err["type"] == "extra_forbidden" and loc[:1] == ["model"]:
        return (
            f"{key} does not apply to {exc.errors()[0]['loc'][1]}; each architecture reads only its own keys"
        )
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    if err["type"] == "union_tag_invalid":
        return f"{key}: {msg}"
    if err["type"] == "missing":
        return f"missing key {key!r}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {_quoted(value)})"
    return f"{key}: {msg}{shown}"
