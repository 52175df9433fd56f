"""params.yaml -> one validated object; every malformed input refused with the key named."""

from __future__ import annotations

import pytest
import yaml

from models import STRATEGIES
from tasks.config import ConfigError, load_params, parse_params
from tests.conftest import REPO, small_raw


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "digits"
    assert params.shrink.candidates, "the default config declares candidates"
    assert {c.strategy for c in params.shrink.candidates.values()} <= set(STRATEGIES)


def test_overrides_apply_and_are_validated(tmp_path):
    params = load_params(REPO / "params.yaml", ["train.epochs=3", "promote.tolerance=0.5"])
    assert params.train.epochs == 3 and params.promote.tolerance == 0.5
    with pytest.raises(ConfigError, match="train.epochs"):
        load_params(REPO / "params.yaml", ["train.epochs=zero"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_params(REPO / "params.yaml", ["train.epochs"])


def test_params_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(Exception, match="frozen"):
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
