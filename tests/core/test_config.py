"""params.yaml validation: every stage refuses bad params with one actionable message."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.core.config import Params, ParamsError, _describe, load_params, parse_params
from tests.conftest import ROOT, stage_env


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


def test_tag_params_name_settings_and_give_their_values_as_text(params_dict):
    params_dict["mlflow"]["tag_params"] = ["train.learning_rate", "train.seeds", "data.dataset"]
    assert parse_params(params_dict).tag_values() == {
        "train.learning_rate": "0.001",
        "train.seeds": "[0]",
        "data.dataset": "mnist",
    }
    params_dict["mlflow"]["tag_params"] = ["train.lr", "train.optimizer"]  # a section is no setting
    with pytest.raises(ParamsError, match="names train.lr, train.optimizer, which is not a"):
        parse_params(params_dict)
    params_dict["mlflow"]["tag_params"] = ["train.epochs", "train.epochs"]
    with pytest.raises(
        ParamsError, match="'mlflow.tag_params' is invalid: values must be distinct"
    ):
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


# ---------------------------------------------------------------------------------------------
# params.yaml as DVC reads it: YAML 1.2, where `1e-3` is a number


FLOAT_KEYS = {  # every float key, and a setting that lets it apply
    "model.dropout_rate": {},
    "train.learning_rate": {},
    "train.optimizer.beta_1": {"train.optimizer.name": "adamw"},
    "train.optimizer.beta_2": {"train.optimizer.name": "adamw"},
    "train.optimizer.epsilon": {"train.optimizer.name": "adamw"},
    "train.optimizer.weight_decay": {"train.optimizer.name": "adamw"},
    "train.optimizer.momentum": {"train.optimizer.name": "sgd"},
    "overrides.tf.epsilon": {},
    "overrides.torch.epsilon": {},
    "export.load_test.time_limit_seconds": {},
    "export.load_test.server_start_seconds": {},
}


def _set(text: str, dotted: str, value: str) -> str:
    """Return params.yaml's text with `dotted` set to the literal `value`, as a user edits it."""
    lines, depth, parts = text.splitlines(), 0, dotted.split(".")
    for index, line in enumerate(lines):
        if line.strip().startswith(f"{parts[depth]}:") and line.startswith("  " * depth):
            if depth == len(parts) - 1:
                lines[index] = f"{'  ' * depth}{parts[depth]}: {value}"
                return "\n".join(lines) + "\n"
            depth += 1
    raise AssertionError(f"{dotted} not found in params.yaml")


def _get(params: Params, dotted: str) -> object:
    node = params
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize(
    ("written", "value"),
    [("1e-3", 1e-3), ("1E-3", 1e-3), ("1e-08", 1e-8), (".5", 0.5), ("5e-1", 0.5)],
)
@pytest.mark.parametrize("key", sorted(FLOAT_KEYS))
def test_float_keys_take_every_way_of_writing_a_float(tmp_path, key, written, value):
    text = (ROOT / "params.yaml").read_text()
    for other, setting in FLOAT_KEYS[key].items():
        text = _set(text, other, setting)
    path = tmp_path / "params.yaml"
    path.write_text(_set(text, key, written))
    assert _get(load_params(path), key) == value


def test_large_floats_in_exponent_form(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        _set((ROOT / "params.yaml").read_text(), "export.load_test.time_limit_seconds", "5e2")
    )
    assert load_params(path).export.load_test.time_limit_seconds == 500.0


@pytest.mark.parametrize(
    ("key", "written", "message"),
    [
        (
            "train.epochs",
            "5e2",
            "'train.epochs' = 500.0 is invalid: a whole number is needed and 500.0 is a float "
            "(an exponent or a decimal point makes one); write 500",
        ),
        (
            "train.learning_rate",
            "'1e-3'",
            "'train.learning_rate' = '1e-3' is invalid: Input should be a valid number",
        ),
        (
            "train.learning_rate",
            "true",
            "'train.learning_rate' = True is invalid: Input should be a valid number",
        ),
        (
            "train.learning_rate",
            "[0.001]",
            "'train.learning_rate' = [0.001] is invalid: Input should be a valid number",
        ),
        (
            "train.deterministic",
            "yes",
            "'train.deterministic' = 'yes' is invalid: Input should be a valid boolean",
        ),
    ],
)
def test_types_stay_strict(tmp_path, key, written, message):
    path = tmp_path / "params.yaml"
    path.write_text(_set((ROOT / "params.yaml").read_text(), key, written))
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value) == f"{path} is invalid:\n  {message}"


KEEP_ONE = "keep one (DVC refuses the file too)"


def test_a_section_given_twice_is_refused_naming_both_lines(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    first = 1 + text.splitlines().index(
        "train:                           # shared by both trainers: the fair comparison is the default"
    )
    path = tmp_path / "params.yaml"
    path.write_text(text + "train:\n  epochs: 3\n  epochs: 4\n")
    last = len(text.splitlines()) + 1
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value).splitlines() == [
        f"{path} is invalid:",
        f"  'train' is given twice, on lines {first} and {last}; {KEEP_ONE}",
        f"  'train.epochs' is given twice, on lines {last + 1} and {last + 2}; {KEEP_ONE}",
    ]


@pytest.mark.parametrize("content", ["", "\n# only a comment\n"])
def test_an_empty_params_file_is_refused(tmp_path, content):
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value) == (
        f"{path} is empty; restore it (`git checkout -- {path}`) or write the sections it needs "
        "(see the repository's params.yaml)"
    )


def test_a_params_directory_is_refused_in_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "stages.check_params", "--params", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=stage_env(),
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {path} is a directory, not a file; remove it and restore the file "
        f"(`git checkout -- {path}`) or pass --params"
    ]


def _dvc(repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env=stage_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
    )


@pytest.mark.parametrize(
    "settings",
    [  # every float key set the way DVC writes small floats (`1e-08`), in two runs
        {
            "train.optimizer.name": "adamw",
            "train.learning_rate": "3e-4",
            "train.optimizer.beta_1": "8.5e-1",
            "train.optimizer.beta_2": "9.99e-1",
            "train.optimizer.epsilon": "1e-8",
            "train.optimizer.weight_decay": "1e-4",
            "model.dropout_rate": "2.5e-1",
            "overrides.tf.epsilon": "1e-7",
            "overrides.torch.epsilon": "1E-8",
            "export.load_test.time_limit_seconds": "5e2",
            "export.load_test.server_start_seconds": ".5",
        },
        {
            "train.optimizer.name": "sgd",
            "train.optimizer.momentum": "9e-1",
            "train.optimizer.weight_decay": "5e-4",
        },
    ],
    ids=["adamw", "sgd"],
)
def test_dvc_exp_run_with_small_floats_passes_check_params_and_both_see_one_value(
    tmp_path, settings
):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo)
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["check-params"]
    stage["deps"] = []  # the code stays in the checkout (on PYTHONPATH); params.yaml is the dep
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"check-params": stage}}))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "params"]):
        subprocess.run(
            ["git", "-c", "user.email=t@localhost", "-c", "user.name=t", *args],
            cwd=repo,
            check=True,
            capture_output=True,
        )
    assert _dvc(repo, "init", "-q").returncode == 0
    done = _dvc(repo, "exp", "run", *[a for k, v in settings.items() for a in ("-S", f"{k}={v}")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "params.yaml: valid" in done.stdout
    seen_by_dvc = json.loads(_dvc(repo, "params", "diff", "--all", "--json").stdout)["params.yaml"]
    params = load_params(repo / "params.yaml")
    for key in settings:
        assert _get(params, key) == seen_by_dvc[key]["new"], key
    assert params.train.optimizer.name == settings["train.optimizer.name"]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (["order", "order"], "seed_parts names a part twice: \\['order', 'order'\\]"),
        ([], "'train.seed_parts' = \\[\\]"),
        (["weights"], "'train.seed_parts.0' = 'weights'"),
    ],
)
def test_seed_parts_are_each_source_at_most_once(params_dict, parts, message):
    params_dict["train"]["seed_parts"] = parts
    with pytest.raises(ParamsError, match=message):
        parse_params(params_dict)


@pytest.mark.parametrize(("dataset", "target"), [("mnist", 0.97), ("fashion-mnist", 0.85)])
def test_the_target_accuracy_is_the_datasets_unless_given(params_dict, dataset, target):
    params_dict["data"]["dataset"] = dataset
    assert params_dict["train"]["target_accuracy"] is None  # params.yaml leaves it to the data
    assert parse_params(params_dict).run_config("tf").train.target_accuracy == target
    params_dict["train"]["target_accuracy"] = 0.5
    assert parse_params(params_dict).run_config("torch").train.target_accuracy == 0.5
    for bad in (0.0, 1.5):
        params_dict["train"]["target_accuracy"] = bad
        with pytest.raises(ParamsError, match="'train.target_accuracy'"):
            parse_params(params_dict)


def test_validation_steps_are_a_whole_number_from_0(params_dict):
    params_dict["train"]["eval_every_steps"] = -1
    with pytest.raises(ParamsError, match="'train.eval_every_steps' = -1"):
        parse_params(params_dict)
