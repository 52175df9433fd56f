"""The one typed configuration: ``params.yaml`` parsed into a frozen, validated object.

Every stage reads its own section from :class:`Params`; nothing else indexes raw dicts.
Unknown keys, wrong types and out-of-range values are refused with a one-line
:class:`ConfigError` that names the offending key.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models import ARCHITECTURES, STRATEGIES


class ConfigError(ValueError):
    """A params file or override that cannot be turned into :class:`Params`."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(gt=0, lt=1)]


class DataConfig(_Section):
    source: Literal["digits"] = "digits"
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.2

    @model_validator(mode="after")
    def _leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("data.val_fraction + data.test_fraction must stay below 0.9")
        return self


class ModelConfig(_Section):
    arch: str = "basenet"
    channels: tuple[Annotated[int, Field(ge=1)], ...] = (32, 64)
    hidden: tuple[Annotated[int, Field(ge=1)], ...] = (128,)
    batch_norm: bool = False

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture; choose one of {sorted(ARCHITECTURES)}")
        return arch


class TrainConfig(_Section):
    epochs: Annotated[int, Field(ge=1)] = 30
    batch_size: Annotated[int, Field(ge=1)] = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    scheduler: Literal["cosine", "step", "none"] = "cosine"


class _Candidate(_Section):
    """Fields every candidate has; subclasses add their strategy's own options."""

    epochs: Annotated[int, Field(ge=1)] | None = None
    lr: Annotated[float, Field(gt=0)] | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for the strategy function."""
        return self.model_dump(exclude={"strategy", "epochs", "lr"})


class WidthCandidate(_Candidate):
    """The seed's AdjustedNet: every width multiplied by ``1 - ratio``, trained afresh."""

    strategy: Literal["width"]
    ratio: Fraction


class PruneCandidate(_Candidate):
    """Structured channel pruning of the trained baseline, then fine-tuning."""

    strategy: Literal["prune_l1", "prune_taylor"]
    ratio: Fraction
    global_pruning: bool = False


CandidateConfig = Annotated[WidthCandidate | PruneCandidate, Field(discriminator="strategy")]

# Each registered strategy must be declarable in params.yaml, and nothing else may be.
_DECLARED = {
    s for cls in (WidthCandidate, PruneCandidate) for s in cls.model_fields["strategy"].annotation.__args__
}
assert set(STRATEGIES) == _DECLARED, f"config and strategy registry disagree: {_DECLARED ^ set(STRATEGIES)}"


class ShrinkConfig(_Section):
    workers: Annotated[int, Field(ge=1)] = 2
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


class EvaluateConfig(_Section):
    latency_warmup: Annotated[int, Field(ge=0)] = 10
    latency_repeats: Annotated[int, Field(ge=1)] = 50


class TrackingConfig(_Section):
    experiment: Annotated[str, Field(min_length=1)] = "shrinkflow"


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
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    if err["type"] == "missing":
        return f"missing key {key!r}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{key}: {msg}{shown}"
