"""Tests of tf_balancer.config: validation, dict/YAML round trips, the recipes in configs/."""

from __future__ import annotations

import dataclasses
import math
import pathlib

import pytest
import yaml

from tf_balancer.config import (
    DEFAULT_PASSES,
    BalanceConfig,
    OptimizeConfig,
    SparsityConfig,
    VerifyConfig,
    dump_config,
    load_config,
)
from tf_balancer.errors import ConfigError
from tf_balancer.passes import BUILTIN_PASSES
from tf_balancer.passes.base import (
    GraphPass,
    PassResult,
    register_pass,
    registered_passes,
    unregister_pass,
)

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


class _StandIn(GraphPass):
    def run(self, model, graph, ctx):
        return PassResult(model, changed=False, message="stand-in")


@pytest.fixture
def builtin_passes():
    """The built-in passes the recipes name are all registered (no stand-ins)."""
    assert set(BUILTIN_PASSES) <= set(registered_passes())


@pytest.fixture
def throwaway_pass():
    """A pass registered only for one test."""
    register_pass("config_test_pass")(type("ConfigTestPass", (_StandIn,), {}))
    yield "config_test_pass"
    unregister_pass("config_test_pass")


def _full_config() -> OptimizeConfig:
    return OptimizeConfig(
        passes=("strip_training_ops", "prune_channels", "prune_weights", "fold_batchnorm"),
        balance=BalanceConfig(target=0.3, importance={"taylor": 1.0, "bn_scale": 0.5}, round_to=8),
        sparsity=SparsityConfig(target_sparsity=0.5, m_by_n=(2, 4), end_step=50, power=2),
        verify=VerifyConfig(rtol=1e-3, atol=0.0, probe_batch_size=4),
        fail_on_error=True,
    )


def test_defaults_are_valid(builtin_passes):
    config = OptimizeConfig()
    assert config.passes == DEFAULT_PASSES
    assert config.balance is None and config.sparsity is None and config.fail_on_error is False
    assert config.verify == VerifyConfig(rtol=1e-4, atol=1e-5, probe_batch_size=8)
    assert BalanceConfig().to_dict() == {
        "target": 0.5,
        "target_metric": "flops",
        "strategy": "balanced",
        "importance": "taylor",
        "min_keep": 4,
        "max_prune_fraction": 0.9,
        "round_to": 1,
    }
    assert SparsityConfig().to_dict() == {
        "target_sparsity": 0.8,
        "m_by_n": None,
        "strategy": "balanced",
        "begin_step": 0,
        "end_step": 1000,
        "frequency": 100,
        "power": 3,
    }


BAD_SECTION_VALUES = [
    ("balance", "target", 0),
    ("balance", "target", 1.5),
    ("balance", "target", "0.5"),
    ("balance", "target", math.nan),
    ("balance", "target", None),
    ("balance", "target_metric", "macs"),
    ("balance", "target_metric", 1),
    ("balance", "strategy", "random"),
    ("balance", "importance", "l2"),
    ("balance", "importance", 3),
    ("balance", "importance", {}),
    ("balance", "importance", {"taylor": 0, "magnitude": 0.0}),
    ("balance", "min_keep", 0),
    ("balance", "min_keep", 4.0),
    ("balance", "min_keep", "4"),
    ("balance", "max_prune_fraction", 0),
    ("balance", "max_prune_fraction", 1.0),
    ("balance", "round_to", 0),
    ("balance", "round_to", 8.0),
    ("balance", "round_to", "fast"),
    ("sparsity", "target_sparsity", 1.0),
    ("sparsity", "target_sparsity", -0.1),
    ("sparsity", "target_sparsity", "0.8"),
    ("sparsity", "m_by_n", [4, 2]),
    ("sparsity", "m_by_n", [2, 2]),
    ("sparsity", "m_by_n", [2]),
    ("sparsity", "m_by_n", [1, 2, 4]),
    ("sparsity", "m_by_n", "2:4"),
    ("sparsity", "m_by_n", [0, 4]),
    ("sparsity", "m_by_n", [2.0, 4]),
    ("sparsity", "strategy", "global"),
    ("sparsity", "begin_step", -1),
    ("sparsity", "begin_step", 0.0),
    ("sparsity", "end_step", 0),
    ("sparsity", "end_step", 10.5),
    ("sparsity", "frequency", 0),
    ("sparsity", "power", 0),
    ("sparsity", "power", 3.0),
    ("verify", "rtol", -1e-4),
    ("verify", "rtol", "1e-4"),
    ("verify", "rtol", math.inf),
    ("verify", "atol", -1.0),
    ("verify", "probe_batch_size", 0),
    ("verify", "probe_batch_size", 8.0),
]

SECTIONS = {"balance": BalanceConfig, "sparsity": SparsityConfig, "verify": VerifyConfig}


@pytest.mark.parametrize(("section", "field", "value"), BAD_SECTION_VALUES)
def test_bad_section_value_names_dotted_key(section, field, value):
    with pytest.raises(ConfigError, match="expected") as info:
        SECTIONS[section].from_dict({field: value})
    assert f"{section}.{field}" in str(info.value)


NUMERIC_FIELDS = [
    (section, field.name)
    for section, cls in SECTIONS.items()
    for field in dataclasses.fields(cls)
    if field.type in ("float", "int", "int | str")
]


@pytest.mark.parametrize(("section", "field"), NUMERIC_FIELDS)
@pytest.mark.parametrize("flag", [True, False])
def test_bool_rejected_where_number_expected(section, field, flag):
    with pytest.raises(ConfigError, match=rf"{section}\.{field}: got {flag} \(bool\)"):
        SECTIONS[section](**{field: flag})


def test_bool_rejected_as_importance_weight():
    with pytest.raises(ConfigError, match=r"balance\.importance\.taylor: got True"):
        BalanceConfig(importance={"taylor": True})


def test_numeric_fields_cover_every_number():
    assert len(NUMERIC_FIELDS) == 4 + 5 + 3  # balance, sparsity, verify


def test_int_accepted_for_float_and_stored_as_float():
    config = BalanceConfig(target=1, importance={"taylor": 2, "magnitude": 0})
    assert isinstance(config.target, float) and config.target == 1.0
    assert dict(config.importance) == {"taylor": 2.0, "magnitude": 0.0}
    assert all(isinstance(w, float) for w in config.importance.values())


def test_string_number_in_yaml_gets_exponent_hint(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("verify:\n  rtol: 1e-4\n")
    with pytest.raises(ConfigError, match=r"verify\.rtol: got '1e-4' \(str\).*1\.0e-4"):
        load_config(path)


def test_m_by_n_needs_matching_target_sparsity():
    with pytest.raises(ConfigError, match=r"sparsity\.target_sparsity: got 0\.8.*0\.5"):
        SparsityConfig(m_by_n=(2, 4))
    assert SparsityConfig(target_sparsity=0.25, m_by_n=[1, 4]).m_by_n == (1, 4)


def test_end_step_must_exceed_begin_step():
    with pytest.raises(ConfigError, match=r"sparsity\.end_step: got 10 .*begin_step \(10\)"):
        SparsityConfig(begin_step=10, end_step=10)


@pytest.mark.parametrize(
    ("data", "dotted"),
    [
        ({"pases": ["grappler"]}, "'pases'"),
        ({"balance": {"targt": 0.5}}, "'balance.targt'"),
        ({"sparsity": {"m_by": [2, 4]}}, "'sparsity.m_by'"),
        ({"verify": {"tol": 0.1}}, "'verify.tol'"),
    ],
)
def test_unknown_key_rejected_by_name(data, dotted):
    with pytest.raises(ConfigError, match="unknown key") as info:
        OptimizeConfig.from_dict(data)
    assert dotted in str(info.value) and "allowed keys" in str(info.value)


def test_unknown_importance_criterion_rejected_by_name():
    with pytest.raises(ConfigError, match=r"unknown key 'balance\.importance\.l2'.*taylor"):
        BalanceConfig(importance={"taylor": 1.0, "l2": 1.0})
    with pytest.raises(ConfigError, match=r"balance\.importance\.magnitude: got -1"):
        BalanceConfig(importance={"magnitude": -1})


@pytest.mark.parametrize("section", ["balance", "sparsity", "verify"])
def test_section_must_be_mapping(section):
    with pytest.raises(ConfigError, match=rf"^{section}: got \[1\].*mapping"):
        OptimizeConfig.from_dict({section: [1]})


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError, match="the top level: got"):
        OptimizeConfig.from_dict(["grappler"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"fail_on_error": 1}, r"fail_on_error: got 1 \(int\); expected true or false"),
        ({"fail_on_error": "yes"}, r"fail_on_error: got 'yes'"),
        ({"passes": []}, r"passes: got \[\].*non-empty"),
        ({"passes": "grappler"}, r"passes: got 'grappler'.*list"),
        ({"passes": [1]}, r"passes\[0\]: got 1"),
        ({"verify": {"rtol": 0.1}}, r"verify: got \{'rtol': 0\.1\}.*from_dict"),
        ({"verify": None}, r"verify: got None .*expected a VerifyConfig"),
        ({"balance": BalanceConfig()}, r"balance: .*'prune_channels' is not in passes"),
    ],
)
def test_bad_top_level_value_names_key(builtin_passes, overrides, match):
    with pytest.raises(ConfigError, match=match):
        OptimizeConfig(**overrides)


def test_unregistered_pass_lists_registered_names(throwaway_pass):
    with pytest.raises(ConfigError, match=r"passes\[1\]: got 'no_such_pass'") as info:
        OptimizeConfig(passes=(throwaway_pass, "no_such_pass"))
    assert throwaway_pass in str(info.value)
    assert OptimizeConfig(passes=[throwaway_pass]).passes == (throwaway_pass,)


def test_duplicate_pass_rejected(throwaway_pass):
    with pytest.raises(ConfigError, match=r"passes\[1\]: got 'config_test_pass'.*at most once"):
        OptimizeConfig(passes=(throwaway_pass, throwaway_pass))


def test_grappler_must_be_last(builtin_passes):
    with pytest.raises(ConfigError, match=r"passes: .*'grappler' as the last pass"):
        OptimizeConfig(passes=("grappler", "fold_batchnorm"))
    assert OptimizeConfig(passes=("fold_batchnorm", "grappler")).passes[-1] == "grappler"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"passes": ("prune_channels",)}, r"'balance' is not set; add a balance: section"),
        ({"balance": BalanceConfig()}, r"add 'prune_channels' to passes"),
        ({"passes": ("prune_weights",)}, r"'sparsity' is not set; add a sparsity: section"),
        ({"sparsity": SparsityConfig()}, r"add 'prune_weights' to passes"),
    ],
)
def test_pruning_pass_and_section_go_together(builtin_passes, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        OptimizeConfig(**kwargs)


def test_dict_round_trip(builtin_passes):
    config = _full_config()
    data = config.to_dict()
    assert data["sparsity"]["m_by_n"] == [2, 4] and type(data["balance"]["importance"]) is dict
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # plain types only
    assert OptimizeConfig.from_dict(data) == config
    assert OptimizeConfig.from_dict(OptimizeConfig().to_dict()) == OptimizeConfig()


def test_yaml_round_trip(builtin_passes, tmp_path):
    for config in (_full_config(), OptimizeConfig()):
        path = tmp_path / "recipe.yaml"
        dump_config(config, path)
        assert load_config(path) == config
        assert load_config(str(path)).to_dict() == config.to_dict()


def test_config_is_frozen_and_hashable(builtin_passes):
    config = _full_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.fail_on_error = False
    with pytest.raises(TypeError):
        config.balance.importance["taylor"] = 0.0
    assert hash(config) == hash(OptimizeConfig.from_dict(config.to_dict()))


def test_with_overrides_validates_and_merges_sections(builtin_passes):
    config = _full_config()
    changed = config.with_overrides(balance={"target": 0.25}, fail_on_error=False)
    assert changed.balance.target == 0.25 and changed.balance.round_to == 8
    assert changed.fail_on_error is False and config.fail_on_error is True
    with pytest.raises(ConfigError, match=r"balance\.round_to: got 0"):
        config.with_overrides(balance={"round_to": 0})
    assert config.with_overrides(balance={"round_to": "auto"}).balance.round_to == "auto"
    with pytest.raises(ConfigError, match=r"unknown key 'balanse'"):
        config.with_overrides(balanse={"target": 0.25})
    lossless = OptimizeConfig().with_overrides(
        passes=("strip_training_ops", "prune_weights"), sparsity={"target_sparsity": 0.5}
    )
    assert lossless.sparsity == SparsityConfig(target_sparsity=0.5)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("passes: [grappler\n", "invalid YAML"),
        ("- grappler\n", "top level must be a mapping.*got list"),
        ("", "top level must be a mapping.*got NoneType"),
        ("verify:\n  probe_batch_size: 0\n", r"verify\.probe_batch_size: got 0"),
    ],
)
def test_load_config_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        "# réglage rapide\npasses: [fold_batchnorm]\n".encode("latin-1"),
        "passes: [fold_batchnorm]\n".encode("utf-16"),
    ],
    ids=["latin1", "utf16"],
)
def test_load_config_not_utf8_is_a_config_error_naming_the_file(tmp_path, data):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match="save the file as UTF-8") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not UTF-8 text")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_recipe_loads(path):
    config = load_config(path)
    assert OptimizeConfig.from_dict(config.to_dict()) == config
    assert ("prune_channels" in config.passes) == (config.balance is not None)


def test_recipes_hold_documented_settings():
    assert {p.name for p in CONFIGS} == {
        "lossless.yaml",
        "structured_50_flops.yaml",
        "sparse_80.yaml",
        "sparse_2of4.yaml",
    }
    root = CONFIGS[0].parent
    assert load_config(root / "lossless.yaml") == OptimizeConfig()
    structured = load_config(root / "structured_50_flops.yaml")
    assert structured.passes[1] == "prune_channels" and structured.balance == BalanceConfig()
    sparse = load_config(root / "sparse_80.yaml").sparsity
    assert sparse == SparsityConfig(target_sparsity=0.8, strategy="balanced")
    two_four = load_config(root / "sparse_2of4.yaml").sparsity
    assert two_four.m_by_n == (2, 4) and two_four.target_sparsity == 0.5
