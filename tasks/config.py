"""The one typed configuration: ``params.yaml`` parsed into a frozen, validated object.

Every stage reads its own section from :class:`Params`; nothing else indexes raw dicts.
Unknown keys, wrong types and out-of-range values are refused with a one-line
:class:`ConfigError` that names the offending key.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models import ARCHITECTURES, STRATEGIES
from models.strategies import STRATEGY_INFO, refusal
from tasks.errors import ShrinkflowError


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
    image_size: Annotated[int, Field(ge=4)] | None = None  # None: keep the source's own size
    channels: Literal[1, 3] | None = None  # None: the source's own (1 if every image is grayscale)
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.2  # ignored when the source has its own test split
    max_train_samples: Annotated[int, Field(ge=1)] | None = None  # a stratified subset of train
    augment: Literal["none", "crop", "crop_flip"] = "none"  # random crop with padding [+ h-flip]

    @model_validator(mode="after")
    def _leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("data.val_fraction + data.test_fraction must stay below 0.9")
        if self.download and self.source not in ("mnist", "fashion_mnist", "cifar10"):
            raise ValueError(f"data.download applies to torchvision sources only, not {self.source}")
        return self


class ModelConfig(_Section):
    """The architecture and its options; each architecture reads only its own keys
    (basenet: channels, hidden, batch_norm; resnet18 and mobilenet_v2: width_mult)."""

    arch: str = "basenet"
    channels: tuple[Annotated[int, Field(ge=1)], ...] = (32, 64)
    hidden: tuple[Annotated[int, Field(ge=1)], ...] = (128,)
    batch_norm: bool = False
    width_mult: Annotated[float, Field(gt=0, le=4)] = 1.0

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture; choose one of {sorted(ARCHITECTURES)}")
        return arch

    @model_validator(mode="after")
    def _keys_the_arch_reads(self) -> ModelConfig:
        # A key the architecture ignores would silently not do what its author meant.
        reads = ARCHITECTURES[self.arch].OPTIONS
        stray = sorted(self.model_fields_set - {"arch"} - set(reads))
        if stray:
            raise ValueError(f"model.{stray[0]} does not apply to {self.arch}, which reads {list(reads)}")
        return self

    def arch_options(self) -> dict[str, Any]:
        """``{"arch": ..., **the options the architecture reads}``, JSON-ready."""
        options = {k: getattr(self, k) for k in ARCHITECTURES[self.arch].OPTIONS}
        return {"arch": self.arch, **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}


class TrainConfig(_Section):
    epochs: Annotated[int, Field(ge=1)] = 30
    batch_size: Annotated[int, Field(ge=1)] = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    # Where training and evaluation run; data stays in CPU memory and checkpoints are saved from
    # CPU tensors either way. auto: cuda when torch sees a GPU, else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"

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


class _Candidate(_Section):
    """Fields every candidate has; subclasses add their strategy's own options. Any candidate
    may fine-tune with ``distill`` and end with ``quantize: int8`` (prune -> distill -> int8)."""

    epochs: Annotated[int, Field(ge=1)] | None = None
    lr: Annotated[float, Field(gt=0)] | None = None
    distill: DistillConfig | None = None
    quantize: Literal["int8"] | None = None
    search: SearchConfig | None = None  # ratio strategies only

    # Fields the pipeline reads around the strategy rather than passing to it.
    _PIPELINE_KEYS: ClassVar[set[str]] = {"strategy", "epochs", "lr", "distill", "quantize", "search"}

    def options(self) -> dict[str, Any]:
        """Keyword arguments for the strategy function."""
        return self.model_dump(exclude=self._PIPELINE_KEYS)

    def steps(self) -> list[str]:
        """The composed steps, in order, e.g. ``["prune_l1", "distill", "int8"]``."""
        return [
            self.strategy,
            *(["distill"] if self.distill else []),
            *([self.quantize] if self.quantize else []),
        ]

    def exclusive(self) -> bool:
        """Whether a step must have its process to itself (see ``StrategyInfo.exclusive``)."""
        return any(STRATEGY_INFO[step].exclusive for step in self.steps() if step in STRATEGY_INFO)

    def sparsity_phase(self) -> tuple[int, float] | None:
        """``(epochs, L1 strength on BatchNorm scales)`` to fine-tune with before the strategy."""
        return None


class _RatioCandidate(_Candidate):
    """A strategy with a ``ratio`` knob: a fixed ratio, or a ``search`` for the largest one within
    tolerance."""

    ratio: Fraction | None = None

    @model_validator(mode="after")
    def _ratio_or_search(self) -> _RatioCandidate:
        if (self.ratio is None) == (self.search is None):
            raise ValueError(f"{self.strategy}: set exactly one of ratio and search")
        return self


class WidthCandidate(_RatioCandidate):
    """The seed's AdjustedNet: every width multiplied by ``1 - ratio``, trained afresh."""

    strategy: Literal["width"]


class DepthCandidate(_RatioCandidate):
    """Fewer layers/blocks (``ratio`` of the removable ones), then fine-tuning."""

    strategy: Literal["depth"]


class PruneCandidate(_RatioCandidate):
    """Structured channel pruning of the trained baseline, then fine-tuning."""

    strategy: Literal["prune_l1", "prune_taylor"]
    global_pruning: bool = False
    iterative_steps: Annotated[int, Field(ge=1, le=20)] = 1


class SlimCandidate(_RatioCandidate):
    """Network slimming: fine-tune with an L1 penalty on BatchNorm scales for ``sparsity_epochs``,
    prune the channels with the smallest scales, fine-tune again."""

    strategy: Literal["slim"]
    global_pruning: bool = True
    iterative_steps: Annotated[int, Field(ge=1, le=20)] = 1
    sparsity: Annotated[float, Field(gt=0)] = 1e-4
    sparsity_epochs: Annotated[int, Field(ge=1)] = 5
    _PIPELINE_KEYS: ClassVar[set[str]] = _Candidate._PIPELINE_KEYS | {"sparsity", "sparsity_epochs"}

    def exclusive(self) -> bool:
        """Whether a step must have its process to itself (see ``StrategyInfo.exclusive``)."""
        return any(STRATEGY_INFO[step].exclusive for step in self.steps() if step in STRATEGY_INFO)

    def sparsity_phase(self) -> tuple[int, float] | None:
        return self.sparsity_epochs, self.sparsity


class MagnitudeCandidate(_RatioCandidate):
    """Unstructured global magnitude pruning of ``ratio`` of the weights; fine-tuning keeps the
    zeros."""

    strategy: Literal["magnitude"]


class Int8Candidate(_Candidate):
    """The baseline quantised to int8 after training; it is not fine-tuned."""

    strategy: Literal["int8"]

    @model_validator(mode="after")
    def _nothing_to_train(self) -> Int8Candidate:
        stray = sorted(self.model_fields_set & {"epochs", "lr", "distill", "quantize", "search"})
        if stray:
            raise ValueError(f"int8 is a final post-training step, so {stray[0]!r} does not apply")
        return self


_CANDIDATES = (
    WidthCandidate,
    DepthCandidate,
    PruneCandidate,
    SlimCandidate,
    MagnitudeCandidate,
    Int8Candidate,
)
CandidateConfig = Annotated[
    WidthCandidate | DepthCandidate | PruneCandidate | SlimCandidate | MagnitudeCandidate | Int8Candidate,
    Field(discriminator="strategy"),
]

# Each registered strategy must be declarable in params.yaml, and nothing else may be.
_DECLARED = {s for cls in _CANDIDATES for s in cls.model_fields["strategy"].annotation.__args__}
assert set(STRATEGIES) == _DECLARED, f"config and strategy registry disagree: {_DECLARED ^ set(STRATEGIES)}"


class ShrinkConfig(_Section):
    workers: Annotated[int, Field(ge=1)] = 2  # candidates trained at once
    # Where the fan-out runs: Prefect's thread pool, its process pool, or a Dask cluster
    # (`dask_address` of a running scheduler, or a local cluster of `workers` processes).
    runner: Literal["thread", "process", "dask"] = "thread"
    dask_address: str | None = None
    epochs: Annotated[int, Field(ge=1)] = 20
    lr: Annotated[float, Field(gt=0)] | None = None
    calibration_size: Annotated[int, Field(ge=1)] = 256
    candidates: dict[str, CandidateConfig]

    @model_validator(mode="after")
    def _valid_names(self) -> ShrinkConfig:
        if not self.candidates:
            raise ValueError("shrink.candidates is empty; declare at least one candidate")
        for name in self.candidates:
            # No dots: DVC reads `shrink.candidates.<name>` as a dotted key path.
            if name == "baseline" or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(
                    f"candidate name {name!r} must be letters, digits, '-' or '_' and not 'baseline'"
                )
        return self


class PromoteConfig(_Section):
    tolerance: Annotated[float, Field(ge=0)] = 1.0
    tolerance_mode: Literal["absolute", "relative"] = "absolute"
    objective: Literal["params", "flops", "size_bytes", "latency_ms"] = "params"
    model_name: Annotated[str, Field(min_length=1)] = "shrinkflow-digits"
    alias: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")] = "champion"
    challenger_alias: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")] = "challenger"
    # Against the current champion, re-measured on the current test data:
    champion_tolerance: Annotated[float, Field(ge=0)] = 0.5  # test points a smaller model may lose
    comparable_size: Annotated[float, Field(ge=0)] = 0.05  # relative size band that counts as "the same"

    @model_validator(mode="after")
    def _distinct_aliases(self) -> PromoteConfig:
        if self.alias == self.challenger_alias:
            raise ValueError("promote.alias and promote.challenger_alias must differ")
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
    candidates: str = "artifacts/candidates"
    reports: str = "reports"


class Params(_Section):
    seed: Annotated[int, Field(ge=0)] = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    shrink: ShrinkConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    tracking: TrackingConfig = TrackingConfig()
    paths: PathsConfig = PathsConfig()

    @model_validator(mode="after")
    def _strategies_fit_the_arch(self) -> Params:
        # Refused here, before any training, rather than when the candidate's turn comes.
        for name, cand in self.shrink.candidates.items():
            for step in cand.steps():
                why = refusal(step, self.model.arch_options()) if step in STRATEGY_INFO else None
                if why:
                    raise ValueError(f"shrink.candidates.{name}: {step} on {self.model.arch} {why}")
        return self


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read ``path``, apply ``key.sub=value`` overrides (values parsed as YAML) and validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"params file {path} does not exist") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        raw = apply_override(raw, item)
    return parse_params(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b.c=value`` set; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    raw = copy.deepcopy(raw)
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)
    return raw


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = list(err["loc"])
    if loc[:2] == ["shrink", "candidates"] and len(loc) > 4:
        del loc[3]  # pydantic inserts the strategy tag of the discriminated union
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a cross-section check names its own keys
        return msg
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    if err["type"] == "missing":
        return f"missing key {key!r}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{key}: {msg}{shown}"
