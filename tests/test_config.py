"""params.yaml validation: every stage refuses bad params with one actionable message."""

import subprocess
import sys

import pytest
import yaml

from stages.config import Params, ParamsError, _describe, load_params, parse_params
from tests.conftest import ROOT


def test_repository_params_are_valid_and_fair():
    params = load_params(ROOT / "params.yaml")
    tf, torch = params.run_config("tf"), params.run_config("torch")
    assert tf.flat() == torch.flat()  # the fair comparison is the default
    assert tf.flat()["scheme"] == "scale" and tf.flat()["train.optimizer.name"] == "adam"
    assert params.model.hidden_units == [128] and params.model.dropout_rate == 0.2
    assert len(params.train.seeds) >= 3


def test_defaults_match_the_file():
    assert load_params(ROOT / "params.yaml").model == Params().model


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "epochs", "five", r"'train.epochs' = 'five' is invalid"),
        ("train", "learning_rate", -1, r"'train.learning_rate' = -1 is invalid: .*greater than 0"),
        ("model", "dropout_rate", 1.5, r"'model.dropout_rate' = 1.5 is invalid: .*less than 1"),
        (
            "data",
            "dataset",
            "cifar",
            r"'data.dataset' = 'cifar' is invalid: .*'mnist' or 'fashion-mnist'",
        ),
        ("train", "seeds", [1, 1], r"'train.seeds' .* must be distinct"),
        ("train", "epochz", 3, r"unknown key 'train.epochz'"),
        ("train.optimizer", "momentun", 0.9, r"unknown key 'train.optimizer.momentun'"),
        ("overrides.torch", "batchsize", 64, r"unknown key 'overrides.torch.batchsize'"),
        ("overrides.tf", "epochs", 3, r"unknown key 'overrides.tf.epochs'"),
    ],
)
def test_bad_value_names_key_value_and_allowed(params_dict, section, key, value, message):
    table = params_dict
    for part in section.split("."):
        table = table[part]
    table[key] = value
    with pytest.raises(ParamsError, match=message):
        parse_params(params_dict)


def test_overrides_apply_to_one_framework_only(params_dict):
    params_dict["overrides"]["torch"].update(
        batch_size=64, scheme="symmetric", epsilon=1e-8, dropout_at_test=True, init="framework"
    )
    params = parse_params(params_dict)
    torch = params.run_config("torch")
    tf = params.run_config("tf")
    assert (torch.train.batch_size, torch.scheme, torch.train.optimizer.epsilon) == (
        64,
        "symmetric",
        1e-8,
    )
    assert torch.train.dropout_at_test and torch.model.init == "framework"
    assert (tf.train.batch_size, tf.scheme, tf.train.dropout_at_test) == (32, "scale", False)
    assert params.schemes() == ["scale", "symmetric"]


def test_stage_exits_non_zero_and_writes_nothing(tmp_path, params_dict):
    params_dict["train"]["batch_size"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.download",
            "--params",
            str(tmp_path / "params.yaml"),
            "--out",
            str(tmp_path / "raw"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
    )
    assert done.returncode == 1
    assert "'train.batch_size' = 0 is invalid" in done.stderr
    assert done.stderr.count("\n") <= 3  # one message, no traceback
    assert not (tmp_path / "raw").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (  # a check across sections names its own keys
            {"train": {"workers": 3}},
            "train.batch_size=64 does not split over 3 workers (train.workers=3 x train.nodes=1): "
            "it is the global batch, and every worker takes an equal slice of it. Use a multiple "
            "of 3, e.g. 63 or 66",
        ),
        (  # one of ours on a field: the key, then the validator's words
            {"train": {"seeds": [1, 1]}},
            "'train.seeds' is invalid: seeds must be distinct, e.g. [0, 1, 2]",
        ),
        (  # pydantic's own: the key, the value, pydantic's words
            {"train": {"epochs": 0}},
            "'train.epochs' = 0 is invalid: Input should be greater than or equal to 1",
        ),
    ],
)
def test_each_kind_of_error_reads_in_full(raw, message):
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert str(error.value) == f"params.yaml is invalid:\n  {message}"


def test_an_error_without_a_key_says_top_level():
    error = {"loc": (), "type": "missing", "msg": "Field required", "input": None}
    assert _describe(error) == "'(top level)' = None is invalid: Field required"


@pytest.mark.parametrize(
    ("rendezvous", "valid"),
    [
        ("10.0.0.1:29500", True),
        ("node-0:1", True),  # the lowest port
        ("[fe80::1]:29500", True),  # IPv6: the port is after the last colon
        (":29500", False),
        ("10.0.0.1:", False),
        ("10.0.0.1:0", False),
        ("10.0.0.1:65536", False),
        ("10.0.0.1:http", False),
    ],
)
def test_the_rendezvous_is_host_and_port(rendezvous, valid):
    raw = {"train": {"nodes": 2, "rendezvous": rendezvous}}
    if valid:
        assert parse_params(raw).train.rendezvous == rendezvous
    else:
        with pytest.raises(
            ParamsError, match=r"'train.rendezvous' is invalid: .* is not host:port"
        ):
            parse_params(raw)


def test_params_are_read_from_the_working_directory_and_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load_params() == load_params(ROOT / "params.yaml")
    bad = tmp_path / "mine.yaml"
    bad.write_text("train: {epochs: 0}\n")
    with pytest.raises(ParamsError, match=rf"^{bad} is invalid:\n  'train.epochs' = 0"):
        load_params(bad)


def test_every_bad_key_is_named_one_per_line():
    with pytest.raises(ParamsError) as error:
        parse_params({"train": {"epochs": 0, "batch_size": 0}})
    assert str(error.value).splitlines() == [
        "params.yaml is invalid:",
        "  'train.epochs' = 0 is invalid: Input should be greater than or equal to 1",
        "  'train.batch_size' = 0 is invalid: Input should be greater than or equal to 1",
    ]
