"""params.yaml -> one validated object; every malformed input refused with the key named."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from shrinkflow.models import STRATEGIES
from shrinkflow.tasks.config import ConfigError, load_params, parse_params
from tests.conftest import REPO, small_raw


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "digits"
    assert params.shrink.candidates, "the default config declares candidates"
    assert {c.strategy for c in params.shrink.candidates.values()} <= set(STRATEGIES)


def test_each_model_names_its_composition():
    params = load_params(REPO / "params.yaml")
    made_of = {name: params.composition(name) for name in ["baseline", *params.shrink.candidates]}
    assert made_of["baseline"] == "baseline" and made_of["width-50"] == "width"
    assert made_of["l1-75-kd"] == "prune_l1+distill" and made_of["l1-50-int8"] == "prune_l1+int8"
    both = load_params(REPO / "params.yaml", ["shrink.candidates.l1-75-kd.quantize=int8"])
    assert both.composition("l1-75-kd") == "prune_l1+distill+int8"
    brought = load_params(REPO / "examples/byo/params.yaml")
    assert brought.composition("baseline") == brought.model.arch == "factory"
    assert params.promote.max_class_drop == 10, "the per-class guard is on in the shipped params"


def test_overrides_apply_and_are_validated(tmp_path):
    params = load_params(REPO / "params.yaml", ["train.epochs=3", "promote.tolerance=0.5"])
    assert params.train.epochs == 3 and params.promote.tolerance == 0.5
    with pytest.raises(ConfigError, match="train.epochs"):
        load_params(REPO / "params.yaml", ["train.epochs=zero"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_params(REPO / "params.yaml", ["train.epochs"])


def test_params_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        params.train.epochs = 1


BAD = [
    ("unknown top-level key", ["colour=red"], "unknown key 'colour'"),
    ("unknown nested key", ["train.epoch=3"], "unknown key 'train.epoch'"),
    ("wrong type", ["train.batch_size=lots"], "train.batch_size"),
    ("negative tolerance", ["promote.tolerance=-1"], "promote.tolerance"),
    ("ratio of one", ["shrink.candidates.w50.ratio=1.0"], "shrink.candidates.w50.ratio"),
    ("ratio of zero", ["shrink.candidates.w50.ratio=0"], "ratio"),
    ("unknown strategy", ["shrink.candidates.w50.strategy=shrinkray"], "shrinkray"),
    ("empty candidates", ["shrink.candidates={}"], "shrink.candidates is empty"),
    ("unknown architecture", ["model.arch=vgg99"], "vgg99"),
    ("unknown data source", ["data.source=imagenet"], "data.source"),
    ("dotted candidate name", ["shrink.candidates={a.b: {strategy: width, ratio: 0.5}}"], "'a.b'"),
    ("unknown objective", ["promote.objective=vibes"], "promote.objective"),
    (
        "fractions leave no training data",
        ["data.val_fraction=0.5", "data.test_fraction=0.45"],
        "val_fraction",
    ),
    ("zero epochs", ["train.epochs=0"], "train.epochs"),
    ("unknown optimizer", ["train.optimizer=lion"], "train.optimizer"),
    ("bad alias", ["promote.alias=9lives"], "promote.alias"),
    ("model name with a slash", ["promote.model_name=team/digits"], "promote.model_name"),
    ("model name with a colon", ["promote.model_name=digits:v2"], "cannot contain ':'"),
    ("alias 'latest' is reserved by MLflow", ["promote.alias=latest"], "reserved by MLflow"),
    ("alias 'v3' is reserved by MLflow", ["promote.alias=v3"], "'v3' is reserved"),
    ("challenger alias 'V12' is reserved", ["promote.challenger_alias=V12"], "promote.challenger_alias"),
    ("seed above 2^32-1", ["seed=4294967296"], "seed"),
    ("negative seed", ["seed=-1"], "seed"),
    (
        "relative tolerance above 100",
        ["promote.tolerance_mode=relative", "promote.tolerance=150"],
        "at most 100",
    ),
    ("more conv stages than the digits' 8x8 allows", ["model.channels=[8, 8, 8, 8]"], "at least 16x16"),
    (
        "more conv stages than data.image_size allows",
        ["data.source=imagefolder", "data.image_size=8", "model.channels=[8, 8, 8, 8]"],
        "data.image_size gives 8x8",
    ),
    (
        "strategy option on the wrong strategy",
        ["shrink.candidates.w50.global_pruning=true"],
        "global_pruning",
    ),
]


@pytest.mark.parametrize(("case", "overrides", "named"), BAD, ids=[b[0] for b in BAD])
def test_malformed_params_are_refused_naming_the_key(case, overrides, named):
    with pytest.raises(ConfigError) as info:
        parse_params(small_raw(*overrides))
    message = str(info.value)
    assert named in message
    assert "\n" not in message, "errors are one line"


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 0\ntrain: [epochs: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml: YAML syntax error at line \d"):
        load_params(bad)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_params(tmp_path / "list.yaml")


def test_largest_seed_and_relative_tolerance_of_100_are_accepted():
    params = parse_params(
        small_raw("seed=4294967295", "promote.tolerance_mode=relative", "promote.tolerance=100")
    )
    assert params.seed == 2**32 - 1 and params.promote.tolerance == 100


def test_duplicate_keys_are_refused_in_the_file_and_in_overrides(tmp_path):
    dup = tmp_path / "params.yaml"
    dup.write_text("seed: 0\ntrain:\n  epochs: 3\n  epochs: 40\n")
    with pytest.raises(ConfigError, match=r"line 4: duplicate key 'epochs'"):
        load_params(dup)
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_params(REPO / "params.yaml", ["train={epochs: 3, epochs: 4}"])


@pytest.mark.parametrize(
    ("case", "make", "named"),
    [
        ("a directory", lambda p: p.mkdir(), "is a directory"),
        ("a binary file", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00"), "not UTF-8 text"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_unreadable_params_file_is_one_line(tmp_path, case, make, named):
    path = tmp_path / "params.yaml"
    make(path)
    with pytest.raises(ConfigError, match=named) as info:
        load_params(path)
    assert "\n" not in str(info.value)


def test_yaml_error_inside_an_override_value_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'train=\{epochs: 3': the value is not valid YAML"):
        load_params(REPO / "params.yaml", ["train={epochs: 3"])


def test_the_candidate_classes_a_worker_receives_are_found_by_name():
    """The process and Dask runners send the config pickled. Pickle sends a class by reference
    (module and name) only where that name finds the very class; a class built at import and
    not found is sent by value (cloudpickle), arrives as a copy the union's serializer does not
    recognise, and every dump of the config in the worker warns once per candidate."""
    import importlib
    import warnings

    params = load_params(REPO / "params.yaml")
    for candidate in params.shrink.candidates.values():
        cls = type(candidate)
        assert getattr(importlib.import_module(cls.__module__), cls.__qualname__, None) is cls, cls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params.model_dump()
