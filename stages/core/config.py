"""Typed, validated view of params.yaml: every stage loads it once, in main(), through `load_params`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode

from stages.core.common import StageError
from stages.core.dataset import DATASETS, IMAGE_SHAPE

Framework = Literal["tf", "torch"]


FRAMEWORKS: tuple[Framework, ...] = ("tf", "torch")


Scheme = Literal["scale", "symmetric", "standardize"]


Init = Literal["framework", "glorot", "shared"]


TfFormat = Literal["onnx", "saved_model", "litert"]


TorchFormat = Literal["onnx", "torch_export"]


# Strict: `epochs: true` is not 1 and `learning_rate: yes` is not a number. Ranges via Field.
Int = Annotated[int, Strict()]


Float = Annotated[float, Strict()]


Bool = Annotated[bool, Strict()]


SeedPart = Literal["init", "order", "dropout"]
SEED_PARTS: tuple[SeedPart, ...] = ("init", "order", "dropout")


_USES = {  # the optimizer settings each optimizer reads
    "adam": {"beta_1", "beta_2", "epsilon"},
    "adamw": {"beta_1", "beta_2", "epsilon", "weight_decay"},
    "sgd": {"momentum", "nesterov", "weight_decay"},
}


class ParamsError(StageError):
    """params.yaml is missing, unreadable or invalid; the message says which key and how to fix it."""


class _Frozen(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are rejected wherever a float is read
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MlflowConfig(_Frozen):
    experiment_name: Annotated[str, Field(min_length=1)] = "tf-vs-torch"
    # params keys (`train.learning_rate`) whose values the runs of the stages that list
    # mlflow.tag_params in dvc.yaml carry as tags, so `mlflow ui` can group runs by them
    tag_params: list[str] = []

    _distinct = field_validator("tag_params")(lambda values: _distinct_values(values))


class DataConfig(_Frozen):
    dataset: Literal["mnist", "fashion-mnist"] = "mnist"


class NormalizeConfig(_Frozen):
    scheme: Scheme = "scale"
    val_size: Annotated[Int, Field(ge=0, le=30000)] = 5000
    seed: Annotated[Int, Field(ge=0)] = 0


class CnnConfig(_Frozen):
    """The convolutional network (`model.kind: cnn`); the defaults are Keras's MNIST example."""

    filters: Annotated[list[Annotated[Int, Field(ge=1, le=1024)]], Field(min_length=1)] = [32, 64]
    kernel_size: Annotated[Int, Field(ge=1, le=9)] = 3
    pool_size: Annotated[Int, Field(ge=1, le=4)] = 2
    dropout_rate: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.5


ModelKind = Literal["mlp", "cnn"]


MODEL_KINDS: tuple[ModelKind, ...] = ("mlp", "cnn")


_MLP_ONLY = ("hidden_units", "dropout_rate")  # the settings only the MLP reads


class ModelConfig(_Frozen):
    """One spec that both trainers build (stages/core/network.py); a setting of the kind not
    chosen is refused, so a sweep over it cannot silently train the same network twice."""

    kind: ModelKind = "mlp"
    hidden_units: Annotated[list[Annotated[Int, Field(ge=1, le=65536)]], Field(min_length=1)] = [
        128
    ]
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"  # hidden layers, convolutions
    dropout_rate: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.2
    init: Init = "glorot"
    cnn: CnnConfig = CnnConfig()

    @model_validator(mode="after")
    def _settings_apply(self) -> ModelConfig:
        defaults = ModelConfig.model_fields
        if self.kind == "cnn":
            for key in _MLP_ONLY:
                if getattr(self, key) != defaults[key].default:
                    raise ValueError(
                        f"{key}={getattr(self, key)!r} has no effect with kind cnn; it applies to "
                        f"kind mlp only. Leave it at {defaults[key].default!r} and set "
                        "model.cnn.* instead (model.cnn.dropout_rate is the CNN's dropout)"
                    )
            _check_feature_map(self.cnn)
        elif self.cnn != CnnConfig():
            changed = [
                key for key, value in self.cnn if value != CnnConfig.model_fields[key].default
            ]
            raise ValueError(
                f"model.cnn.{changed[0]}={getattr(self.cnn, changed[0])!r} has no effect with kind "
                "mlp; it applies to kind cnn only. Set model.kind: cnn or leave model.cnn at its "
                "defaults"
            )
        return self


def _check_feature_map(cnn: CnnConfig) -> None:
    # each block: a 'valid' convolution shrinks a side by kernel_size - 1, pooling divides it
    side = min(IMAGE_SHAPE)
    for block, _ in enumerate(cnn.filters, start=1):
        side = (side - cnn.kernel_size + 1) // cnn.pool_size
        if side < 1:
            raise ValueError(
                f"model.cnn: after block {block} of {len(cnn.filters)} (filters {cnn.filters}, "
                f"kernel_size {cnn.kernel_size}, pool_size {cnn.pool_size}) nothing of the 28x28 "
                "image is left; use fewer filters entries or a smaller kernel_size or pool_size"
            )


class OptimizerConfig(_Frozen):
    """One meaning per setting in both frameworks; a setting the optimizer ignores is refused.

    weight_decay is decoupled weight decay (Loshchilov & Hutter): before each update every weight
    is shrunk by learning_rate * weight_decay * weight. That is Keras's meaning for every optimizer
    and PyTorch's AdamW's; for SGD the PyTorch trainer applies it the same way, because
    torch.optim.SGD's own weight_decay is L2 added to the gradient (a different update once
    momentum is on). Adam with decoupled weight decay is AdamW, so `adam` takes none.
    """

    name: Literal["adam", "adamw", "sgd"] = "adam"
    beta_1: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.9
    beta_2: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.999
    epsilon: Annotated[Float, Field(gt=0.0, le=1.0)] = 1e-7
    weight_decay: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.0
    momentum: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.0
    nesterov: Bool = False

    @model_validator(mode="after")
    def _settings_apply(self) -> OptimizerConfig:
        uses = _USES[self.name]
        defaults = OptimizerConfig.model_fields
        for key in ("beta_1", "beta_2", "epsilon", "weight_decay", "momentum", "nesterov"):
            if key not in uses and getattr(self, key) != defaults[key].default:
                users = [name for name in ("adam", "adamw", "sgd") if key in _USES[name]]
                hint = (
                    " (Adam with decoupled weight decay is AdamW: set name: adamw)"
                    if key == "weight_decay"
                    else ""
                )
                raise ValueError(
                    f"{key}={getattr(self, key)!r} has no effect with {self.name}; it applies to "
                    f"{' and '.join(users)} only. Leave it at {defaults[key].default!r} or change "
                    f"name{hint}"
                )
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0 (Nesterov momentum without momentum)")
        return self


def _rendezvous_address(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{value!r} is not host:port (node 0's address and a free port on it, "
            "e.g. 10.0.0.1:29500)"
        )
    return value


class TrainConfig(_Frozen):
    epochs: Annotated[Int, Field(ge=1, le=1000)] = 5
    batch_size: Annotated[Int, Field(ge=1, le=65536)] = 64
    learning_rate: Annotated[Float, Field(gt=0.0, le=10.0)] = 1e-3
    optimizer: OptimizerConfig = OptimizerConfig()
    seeds: Annotated[list[Annotated[Int, Field(ge=0, lt=2**31)]], Field(min_length=1)] = [
        0,
        1,
        2,
        3,
    ]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: Bool = True
    allow_tf32: Bool = False
    dropout_at_test: Bool = False
    # Data-parallel training (stages/training.py, "Distributed training" in the README).
    workers: Annotated[Int, Field(ge=1, le=1024)] = 1  # on this machine
    nodes: Annotated[Int, Field(ge=1, le=1024)] = 1  # machines taking part
    node_rank: Annotated[Int, Field(ge=0)] = 0  # this machine's place; node 0 writes the outputs
    rendezvous: Annotated[str, AfterValidator(_rendezvous_address)] = "127.0.0.1:29500"
    # Time to accuracy: validation every this many steps (0: at each epoch's end only), timed
    # on the training clock, which stops while validating (AlgoPerf's rule), in both frameworks.
    # 0 by default: each stop within an epoch is another TensorFlow graph call, which the clock
    # counts (at 200: TensorFlow's epochs 30% longer, PyTorch's unchanged; docs/pipeline.md).
    eval_every_steps: Annotated[Int, Field(ge=0, le=1_000_000)] = 0
    target_accuracy: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None  # None: the dataset's
    # What varies from seed to seed: the initial weights, the batch order, the dropout masks.
    # A part left out stays at train.seeds[0] for every seed, so one source can vary alone.
    seed_parts: Annotated[list[SeedPart], Field(min_length=1)] = list(SEED_PARTS)

    @model_validator(mode="after")
    def _one_slice_per_worker(self) -> TrainConfig:
        if self.node_rank >= self.nodes:
            raise ValueError(
                f"train.node_rank={self.node_rank} must be below train.nodes={self.nodes} "
                "(nodes count from 0)"
            )
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct, e.g. [0, 1, 2]")
        return seeds

    @field_validator("seed_parts")
    @classmethod
    def _parts_once(cls, parts: list[str]) -> list[str]:
        if len(set(parts)) != len(parts):
            raise ValueError(
                f"seed_parts names a part twice: {parts}; each of init, order, dropout once"
            )
        return parts


class FrameworkOverrides(_Frozen):
    """Departures from the shared settings for one framework; None keeps the shared value."""

    batch_size: Annotated[Int, Field(ge=1, le=65536)] | None = None
    scheme: Scheme | None = None
    init: Init | None = None
    epsilon: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    dropout_at_test: Bool | None = None


class Overrides(_Frozen):
    tf: FrameworkOverrides = FrameworkOverrides()
    torch: FrameworkOverrides = FrameworkOverrides()


def _distinct_values(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"values must be distinct, found {values}")
    return values


class ExportFormats(_Frozen):
    """The deployment formats written per framework; ONNX in both makes the side-by-side row."""

    tf: list[TfFormat] = ["onnx", "saved_model", "litert"]
    torch: list[TorchFormat] = ["onnx", "torch_export"]

    _distinct = field_validator("tf", "torch")(_distinct_values)


class LoadTestConfig(_Frozen):
    """A bounded HTTP load test: a fixed number of requests per concurrency level, a time limit."""

    requests: Annotated[Int, Field(ge=1, le=100_000)] = 100
    concurrency: Annotated[list[Annotated[Int, Field(ge=1, le=64)]], Field(min_length=1)] = [1, 8]
    time_limit_seconds: Annotated[Float, Field(gt=0, le=3600)] = 300.0
    server_start_seconds: Annotated[Float, Field(gt=0, le=3600)] = 180.0

    _distinct = field_validator("concurrency")(_distinct_values)


class ExportConfig(_Frozen):
    formats: ExportFormats = ExportFormats()
    serve: Bool = True
    load_test: LoadTestConfig = LoadTestConfig()


class EvaluateConfig(_Frozen):
    # accuracy points: |TensorFlow - PyTorch| below this counts as equivalent (TOST)
    equivalence_margin: Annotated[Float, Field(gt=0.0, le=100.0)] = 0.2


class Params(_Frozen):
    mlflow: MlflowConfig = MlflowConfig()
    data: DataConfig = DataConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    overrides: Overrides = Overrides()
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _tag_params_exist(self) -> Params:
        settings = _flatten(self.model_dump(exclude={"mlflow"}))
        unknown = [key for key in self.mlflow.tag_params if key not in settings]
        if unknown:
            raise ValueError(
                f"mlflow.tag_params names {', '.join(unknown)}, which is not a setting of "
                "params.yaml; give full keys such as train.learning_rate"
            )
        return self

    def tag_values(self) -> dict[str, str]:
        """Return the mlflow.tag_params keys with their values as text: the runs' cell tags."""
        settings = _flatten(self.model_dump(exclude={"mlflow"}))
        return {key: str(settings[key]) for key in self.mlflow.tag_params}

    @model_validator(mode="after")
    def _batches_split_evenly(self) -> Params:
        workers = self.train.workers * self.train.nodes
        for framework in FRAMEWORKS:
            batch_size = self.run_config(framework).train.batch_size
            if batch_size % workers:
                key = self.batch_size_key(framework)
                lower, higher = batch_size // workers * workers, -(-batch_size // workers) * workers
                suggestion = f"{lower} or {higher}" if lower else str(higher)
                raise ValueError(
                    f"{key}={batch_size} does not split over {workers} workers "
                    f"(train.workers={self.train.workers} x train.nodes={self.train.nodes}): it is "
                    f"the global batch, and every worker takes an equal slice of it. Use a "
                    f"multiple of {workers}, e.g. {suggestion}"
                )
        return self

    def batch_size_key(self, framework: Framework) -> str:
        """Return the params key that sets `framework`'s batch size: its override, if given."""
        if getattr(self.overrides, framework).batch_size:
            return f"overrides.{framework}.batch_size"
        return "train.batch_size"

    def schemes(self) -> list[Scheme]:
        """Return every normalization scheme some trainer reads, the shared one first."""
        wanted = [self.normalize.scheme] + [self.run_config(f).scheme for f in FRAMEWORKS]
        return list(dict.fromkeys(wanted))

    def target_accuracy(self) -> float:
        """Return train.target_accuracy, or the dataset's default target when it is null."""
        if self.train.target_accuracy is not None:
            return self.train.target_accuracy
        return DATASETS[self.data.dataset].target_accuracy

    def run_config(self, framework: Framework) -> RunConfig:
        """Return the resolved settings one trainer uses: shared values with its overrides applied."""
        extra = getattr(self.overrides, framework)
        optimizer = self.train.optimizer
        if extra.epsilon is not None:
            optimizer = optimizer.model_copy(update={"epsilon": extra.epsilon})
        model = self.model
        if extra.init is not None:
            model = model.model_copy(update={"init": extra.init})
        train = self.train.model_copy(
            update={
                "optimizer": optimizer,
                "batch_size": extra.batch_size or self.train.batch_size,
                "dropout_at_test": (
                    self.train.dropout_at_test
                    if extra.dropout_at_test is None
                    else extra.dropout_at_test
                ),
                "target_accuracy": self.target_accuracy(),
            }
        )
        return RunConfig(
            framework=framework,
            scheme=extra.scheme or self.normalize.scheme,
            model=model,
            train=train,
        )


class RunConfig(_Frozen):
    """Everything one trainer needs, already resolved for its framework."""

    framework: Framework
    scheme: Scheme
    model: ModelConfig
    train: TrainConfig

    def flat(self) -> dict[str, object]:
        """Return the settings as flat `section.key` pairs, the same keys for both frameworks."""
        flat: dict[str, object] = {"scheme": self.scheme}
        for section in ("model", "train"):
            for key, value in getattr(self, section).model_dump().items():
                if isinstance(value, dict):
                    flat.update({f"{section}.{key}.{k}": v for k, v in value.items()})
                else:
                    flat[f"{section}.{key}"] = value
        return flat


def _flatten(section: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _describe(error: Any) -> str:  # pydantic's ErrorDetails
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'; remove it or fix its spelling (see params.yaml's comments)"
    if error["type"] == "value_error" and not error["loc"]:  # across sections: names its keys
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":  # our own validators: the message names the value
        return f"'{key}' is invalid: {error['msg'].removeprefix('Value error, ')}"
    value = error.get("input")
    if error["type"] == "int_type" and isinstance(value, float) and value.is_integer():
        # `5e2` is a float in YAML 1.2, as DVC reads it: a count is written as a whole number
        return (
            f"'{key}' = {value!r} is invalid: a whole number is needed and {value!r} is a float "
            f"(an exponent or a decimal point makes one); write {int(value)}"
        )
    return f"'{key}' = {value!r} is invalid: {error['msg']}"


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Return validated Params from the parsed YAML mapping, or raise ParamsError naming each bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections, found {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e) for e in exc.errors())
        raise ParamsError(f"{source} is invalid:\n  {problems}") from None


def duplicate_keys(node: Node | None, path: tuple[str, ...] = ()) -> list[str]:
    """Return one description per key written twice in the same mapping, with both line numbers."""
    found: list[str] = []
    if isinstance(node, MappingNode):
        first_line: dict[object, int] = {}
        for key, value in node.value:
            name = ".".join((*path, str(key.value)))
            line = key.start_mark.line + 1
            if key.value in first_line:
                found.append(
                    f"'{name}' is given twice, on lines {first_line[key.value]} and {line}"
                )
            else:
                first_line[key.value] = line
            found += duplicate_keys(value, (*path, str(key.value)))
    elif isinstance(node, SequenceNode):
        for item in node.value:
            found += duplicate_keys(item, path)
    return found


def read_params_file(path: Path) -> object:
    """Return the file parsed as DVC parses it (YAML 1.2: `1e-3` is a number), or raise
    ParamsError when it is missing, not a file, empty, not YAML or gives a key twice."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(
            f"{path} not found; run from the repository root or pass --params"
        ) from None
    except IsADirectoryError:
        raise ParamsError(
            f"{path} is a directory, not a file; remove it and restore the file "
            f"(`git checkout -- {path}`) or pass --params"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path} cannot be read: {exc}") from None
    yaml = YAML(typ="safe", pure=True)  # DVC's parser (ruamel.yaml, safe), so both see one value
    try:
        node = yaml.compose(text)
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if node is None:
        raise ParamsError(
            f"{path} is empty; restore it (`git checkout -- {path}`) or write the sections "
            "it needs (see the repository's params.yaml)"
        )
    duplicates = duplicate_keys(node)
    if duplicates:
        raise ParamsError(
            f"{path} is invalid:\n  "
            + "\n  ".join(f"{d}; keep one (DVC refuses the file too)" for d in duplicates)
        )
    try:
        raw = yaml.load(text)
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return raw


def load_params(path: Path | str = "params.yaml") -> Params:
    """Return the validated params read from `path`, or raise ParamsError."""
    path = Path(path)
    return parse_params(read_params_file(path), str(path))
