"""Config loading: types, ranges, unknown keys, overrides, and the files in configs/."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from fedhubert.cli import _stages
from fedhubert.config import Override, dump_config, layer_file, load_config, param, save_config
from fedhubert.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Optim:
    lr: float = param(1e-3, "learning rate", gt=0)
    betas: list[float] = param([0.9, 0.98], "Adam betas", ge=0, lt=1)


@dataclass
class Demo:
    rounds: int = param(3, "rounds", ge=1)
    name: str = param("run", "a name")
    mode: Literal["per-client", "federated"] = param("federated", "k-means mode")
    device: str = param("cpu", "device", choices=["cpu", "cuda"])
    out: Path | None = param(None, "where")
    amp: bool = param(False, "mixed precision")
    weights: dict[str, float] = param({"a": 1.0, "b": 2.0}, "weights", ge=0)
    optim: Optim = param(Optim(), "optimiser")

    def validate(self) -> None:
        if self.name == "forbidden":
            raise ConfigError("key 'name' must not be 'forbidden'")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config(Demo)
    assert cfg == Demo()
    assert cfg.optim.betas == [0.9, 0.98]


def test_yaml_values_are_typed_and_nested_maps_merge(tmp_path):
    cfg = load_config(Demo, write(tmp_path, "rounds: 5\nout: runs/x\noptim:\n  lr: 1\n"))
    assert cfg.rounds == 5 and cfg.out == Path("runs/x")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.9, 0.98]  # untouched sibling keeps its default


def test_unknown_key_names_key_file_and_allowed_keys(tmp_path):
    path = write(tmp_path, "rouds: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(Demo, path)
    message = str(err.value)
    assert str(path) in message and "'rouds'" in message and "did you mean 'rounds'" in message
    assert "allowed keys here:" in message and "optim" in message


def test_unknown_nested_key_is_reported_with_its_dotted_path(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.momentum'.*allowed keys here: betas, lr"):
        load_config(Demo, write(tmp_path, "optim:\n  momentum: 0.9\n"))


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("rounds: three\n", r"key 'rounds' must be an integer, got 'three' \(str\)"),
        ("rounds: true\n", r"key 'rounds' must be an integer, got True"),
        ("rounds: 2.5\n", r"key 'rounds' must be an integer"),
        ("amp: 1\n", r"key 'amp' must be true or false"),
        ("mode: central\n", r"key 'mode' must be one of 'per-client', 'federated'"),
        ("optim: 3\n", r"key 'optim' must be a mapping of lr, betas"),
        ("optim:\n  betas: 0.9\n", r"key 'optim.betas' must be a list"),
        ("weights: {a: x}\n", r"key 'weights.a' must be a number"),
        ("name: null\n", r"key 'name' must be a string, got None"),
    ],
)
def test_wrong_types_name_the_key_the_file_and_the_expected_type(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(Demo, path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("rounds: 0\n", r"key 'rounds' must be >= 1, got 0"),
        ("optim:\n  lr: 0\n", r"key 'optim.lr' must be > 0, got 0.0"),
        ("optim:\n  betas: [0.9, 1.0]\n", r"key 'optim.betas\[1\]' must be < 1, got 1.0"),
        ("weights: {a: -1}\n", r"key 'weights.a' must be >= 0, got -1.0"),
        ("device: tpu\n", r"key 'device' must be one of 'cpu', 'cuda', got 'tpu'"),
    ],
)
def test_out_of_range_values_say_what_is_allowed(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(Demo, write(tmp_path, text))


def test_overrides_are_parsed_as_yaml_and_win_over_the_file(tmp_path):
    path = write(tmp_path, "rounds: 5\nname: fromfile\n")
    cfg = load_config(Demo, path, ["rounds=7", "optim.lr=0.5", "optim.betas=[0.8, 0.9]", "amp=true", "out=/x/y"])
    assert (cfg.rounds, cfg.name, cfg.optim.lr, cfg.optim.betas, cfg.amp, cfg.out) == (
        7,
        "fromfile",
        0.5,
        [0.8, 0.9],
        True,
        Path("/x/y"),
    )


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    assert load_config(Demo, write(tmp_path, "optim:\n  lr: 5e-4\n")).optim.lr == pytest.approx(5e-4)


def test_override_of_a_string_key_keeps_the_text():
    assert load_config(Demo, None, ["name=123"]).name == "123"
    assert load_config(Demo, None, ["name=yes"]).name == "yes"


def test_override_sets_one_dict_entry_while_a_file_replaces_the_dict(tmp_path):
    assert load_config(Demo, None, ["weights.c=3"]).weights == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert load_config(Demo, write(tmp_path, "weights: {c: 3}\n")).weights == {"c": 3.0}


def test_override_can_set_null_on_optional_keys(tmp_path):
    path = write(tmp_path, "out: /a\n")
    assert load_config(Demo, path).out == Path("/a")
    assert load_config(Demo, path, ["out=null"]).out is None
    assert load_config(Demo, None, ["optim.lr=1e-4"]).optim.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("rounds", r"expected KEY=VALUE"),
        ("=3", r"is not a valid key"),
        ("optim..lr=1", r"is not a valid key"),
        ("optim.lrr=1", r"unknown key 'optim.lrr'.*did you mean 'lr'"),
        ("rounds.x=1", r"key 'rounds' is an integer and has no sub-keys"),
        ("rounds=-2", r"command-line override 'rounds=-2': key 'rounds' must be >= 1"),
    ],
)
def test_bad_overrides_are_reported_as_such(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(Demo, None, [override])


def test_cross_field_checks_name_the_source(tmp_path):
    path = write(tmp_path, "name: forbidden\n")
    with pytest.raises(ConfigError, match=rf"{path}: key 'name' must not be 'forbidden'"):
        load_config(Demo, path)


@pytest.mark.parametrize("text, pattern", [("- a\n- b\n", "the top level must be"), ("a: [\n", "not valid YAML")])
def test_malformed_files(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(Demo, write(tmp_path, text))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, tmp_path / "missing.yaml")


def test_resolved_config_reloads_to_the_same_config(tmp_path):
    cfg = load_config(Demo, None, ["rounds=9", "out=/data/run", "weights.z=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Demo, tmp_path / "config.yaml") == cfg
    assert yaml.safe_load(dump_config(cfg))["out"] == "/data/run"


REQUIRED = {
    "partition": ["corpus=/data/LibriSpeech"],
    "kmeans": ["partition=/data/partition"],
    "train-local": ["train_manifests=[/d/a.tsv]", "train_labels=[/d/a.km]"],
    "pretrain": ["partition=/d/p", "kmeans=/d/k"],
    "distill": ["teacher=/d/t.pt", "partition=/d/p"],
    "evaluate-speech-commands": ["dataset=/d/sc", "baseline=fbank"],
    "features": ["partition=/d/p", "client=0"],
    "probe": ["dataset=/d/sc", "checkpoints=[/d/a.pt]"],
}  # keys without a default, given as a user would


@pytest.mark.parametrize("name", sorted(_stages()))
def test_shipped_config_files_equal_the_built_in_defaults(name):
    stage = _stages()[name]
    path = REPO / "configs" / f"{stage.name.replace('-', '_')}.yaml"
    assert path.is_file(), f"{path} missing: every stage ships its config"
    required = REQUIRED.get(stage.name, [])
    assert load_config(stage.config_cls, path, required) == load_config(stage.config_cls, None, required)
    assert yaml.safe_load(path.read_text()).keys() == {f.name for f in dataclasses.fields(stage.config_cls)}


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large"])
def test_model_preset_files_equal_the_built_in_presets(preset):
    from fedhubert.model.config import PRESETS, ModelConfig

    path = REPO / "configs" / "models" / f"{preset}.yaml"
    from_file = load_config(ModelConfig, path)
    assert from_file == load_config(ModelConfig, None, [f"preset={preset}"])
    assert {k: getattr(from_file, k) for k in PRESETS[preset]} == PRESETS[preset]


def test_preset_fields_can_be_overridden_one_by_one():
    from fedhubert.model.config import ModelConfig

    cfg = load_config(ModelConfig, None, ["preset=small", "layers=3"])
    assert (cfg.layers, cfg.embed_dim, cfg.heads) == (3, 384, 6)
    assert load_config(ModelConfig).layers == 12, "the default preset is base"
    with pytest.raises(ConfigError, match="must be divisible by 'model.heads'"):
        load_config(ModelConfig, None, ["preset=tiny", "heads=3"])


def test_every_mistake_of_a_file_and_the_command_line_is_reported_at_once(tmp_path):
    path = write(tmp_path, "rouds: 5\nmode: central\noptim:\n  lr: -1\n  momentum: 0.9\n")
    with pytest.raises(ConfigError) as err:
        load_config(Demo, path, ["amp=maybe", "optim.lrr=1"])
    message = str(err.value)
    assert message.startswith("6 config mistakes:")
    for part in (
        "unknown key 'rouds' (did you mean 'rounds'?)",
        "unknown key 'optim.momentum'",
        "override 'optim.lrr=1': unknown key 'optim.lrr' (did you mean 'lr'?)",
        f"{path}: key 'mode' must be one of 'per-client', 'federated'",
        f"{path}: key 'optim.lr' must be > 0",
        "override 'amp=maybe': key 'amp' must be true or false",
    ):
        assert part in message
    assert len(message.splitlines()) == 7, "one line per mistake"


def test_a_flag_is_named_in_its_messages_instead_of_the_override_it_stands_for():
    with pytest.raises(ConfigError) as err:
        load_config(Demo, None, [Override("rounds=four", "--rounds"), Override("device=tpu", "--device")])
    message = str(err.value)
    assert "--rounds: key 'rounds' must be an integer, got 'four' (str)" in message
    assert "--device: key 'device' must be one of 'cpu', 'cuda', got 'tpu'" in message
    assert "rounds=four" not in message


def test_a_list_key_given_one_value_shows_the_list_syntax(tmp_path):
    from fedhubert.partition.config import PartitionConfig

    with pytest.raises(ConfigError, match=r"write train_subsets=\[train-clean-100\]"):
        load_config(PartitionConfig, None, ["corpus=/c", "train_subsets=train-clean-100"])
    with pytest.raises(ConfigError, match=r"key 'optim.betas' must be a list.*got 0.9 \(float\); write betas: \[0.9\]"):
        load_config(Demo, write(tmp_path, "optim:\n  betas: 0.9\n"))


@pytest.mark.parametrize(
    "module, cls, key, meant",
    [
        ("fedhubert.model.config", "ModelConfig", "num_layers", "layers"),
        ("fedhubert.model.config", "ModelConfig", "num_heads", "heads"),
        ("fedhubert.model.config", "ModelConfig", "layer", "layers"),
        ("fedhubert.pretrain.config", "PretrainConfig", "rounds", "num_rounds"),
        ("fedhubert.partition.config", "PartitionConfig", "num-clients", "num_clients"),
        ("fedhubert.partition.config", "PartitionConfig", "clients", "num_clients"),
    ],
)
def test_did_you_mean_suggests_the_field_with_the_same_words(module, cls, key, meant):
    import importlib

    config_cls = getattr(importlib.import_module(module), cls)
    with pytest.raises(ConfigError, match=rf"unknown key '{key}' \(did you mean '{meant}'\?\)"):
        load_config(config_cls, None, [f"{key}=4"])


def test_a_layer_file_merges_nested_keys_and_is_checked_like_a_config_file(tmp_path):
    base = load_config(Demo, None, ["rounds=4", "optim.betas=[0.5, 0.6]"])
    layered = layer_file(base, write(tmp_path, "optim:\n  lr: 0.5\n"), ("optim", "amp"))
    assert layered == dataclasses.replace(base, optim=Optim(lr=0.5, betas=[0.5, 0.6]))
    path = write(tmp_path, "rounds: 9\noptim:\n  lr: 0\n  lrr: 1\n")
    with pytest.raises(ConfigError) as err:
        layer_file(base, path, ("optim", "amp"))
    message = str(err.value)
    assert f"{path}: key 'rounds' cannot be set in this file (it may set optim, amp)" in message
    assert f"{path}: unknown key 'optim.lrr' (did you mean 'lr'?)" in message
    assert f"{path}: key 'optim.lr' must be > 0, got 0.0" in message


def test_a_layer_file_keeps_explicit_fields_over_a_preset(tmp_path):
    from fedhubert.pretrain.config import PretrainConfig

    base = load_config(PretrainConfig, None, ["partition=/p", "kmeans=/k", "model.preset=tiny", "model.layers=3"])
    layered = layer_file(base, write(tmp_path, "local_steps: 7\n"), ("local_steps", "train"))
    assert (layered.local_steps, layered.model) == (7, base.model)


@pytest.mark.parametrize(
    "overrides, eval_step, log_step",
    [
        ([], 4000, 100),
        (["total_steps=40"], 4, 1),
        (["total_steps=3000"], 300, 30),
        (["total_steps=40", "eval_step=20"], 20, 1),
        (["total_steps=40", "log_step=5"], 4, 5),
        (["total_steps=5"], 1, 1),
    ],
)
def test_evaluate_steps_shorten_eval_and_log_steps_that_were_not_set(overrides, eval_step, log_step):
    from fedhubert.eval.config import SpeechCommandsConfig

    cfg = load_config(SpeechCommandsConfig, None, ["dataset=/d", "baseline=fbank", *overrides])
    assert (cfg.eval_step, cfg.log_step) == (eval_step, log_step)


def test_evaluate_still_refuses_an_eval_step_set_above_the_steps(tmp_path):
    from fedhubert.eval.config import SpeechCommandsConfig

    with pytest.raises(ConfigError, match=r"eval_step \(50\) is above total_steps \(40\)"):
        load_config(SpeechCommandsConfig, None, ["dataset=/d", "baseline=fbank", "total_steps=40", "eval_step=50"])
    shipped = REPO / "configs" / "evaluate_speech_commands.yaml"
    with pytest.raises(ConfigError, match=r"eval_step \(4000\) is above total_steps \(40\)"):
        load_config(SpeechCommandsConfig, shipped, ["dataset=/d", "baseline=fbank", "total_steps=40"])


def test_the_flower_apps_flat_keys_are_each_read_and_each_declared():
    """Every key of [tool.flwr.app.config] is read (by a task, or by the app for every task), and every task's keys
    are declared there (Flower refuses a --run-config key the app does not declare), mapping onto real config
    keys."""
    import tomllib

    from fedhubert.app import TASKS
    from fedhubert.fl.tasks import APP_RUN_KEYS, flat_overrides

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = set(declared["tool"]["flwr"]["app"]["config"])
    tasks = [t for t in TASKS if t.config_cls is not None]
    read_by_tasks = {key for t in tasks for key in t.run_keys}
    assert declared == read_by_tasks | set(APP_RUN_KEYS)
    for task in tasks:
        overrides = flat_overrides(task, dict.fromkeys(task.run_keys, "x"), Path("/repo"))
        for override in overrides:
            key = override.split("=", 1)[0]
            node = task.config_cls()
            for part in key.split("."):
                assert dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}, key
                node = getattr(node, part)


def test_virtual_clients_null_follows_the_runtime_the_server_app_is_in():
    """null: virtual in Flower's simulation engine (its ServerApp's in-memory Grid), one SuperNode per client in a
    deployment (the Grid that talks to the SuperLink), whatever `superlink` says: `flwr run .` against a deployment
    SuperLink sets no `superlink` key. A fedhubert command, which starts the simulation itself unless `superlink`
    is set, infers it from that key; an explicit value always wins."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import HttpGrid, InMemoryGrid

    from fedhubert.fl.config import FederationConfig
    from fedhubert.fl.nodes import in_simulation

    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    simulation = InMemoryGrid(state_factory=state)  # as flwr-simulation makes it
    deployment = HttpGrid("127.0.0.1:9091", insecure=True, token="t")
    assert in_simulation(simulation) and not in_simulation(deployment)
    default = FederationConfig()
    assert default.virtual(in_simulation(simulation)) and not default.virtual(in_simulation(deployment))
    assert default.virtual() and not FederationConfig(superlink="127.0.0.1:9092").virtual()
    assert FederationConfig(virtual_clients=True).virtual(False) and not FederationConfig(
        virtual_clients=False
    ).virtual(True)


def test_launcher_keys_set_under_flwr_run_are_refused_with_flowers_own_setting_named():
    from fedhubert.errors import ConfigError
    from fedhubert.fl.tasks import launcher_keys_unread
    from fedhubert.pretrain.config import PretrainConfig

    paths = ["partition=/p", "kmeans=/k"]
    launcher_keys_unread(
        load_config(PretrainConfig, None, [*paths, "federation.connect_timeout_s=5"])
    )  # the server reads it
    cfg = load_config(PretrainConfig, None, [*paths, "federation.cpus_per_client=2", "federation.timeout_s=60"])
    with pytest.raises(ConfigError) as err:
        launcher_keys_unread(cfg)
    message = str(err.value)
    assert "federation.cpus_per_client is not read (use --federation-config 'client-resources-num-cpus=N')" in message
    assert "federation.timeout_s is not read (use `flwr stop RUN_ID`)" in message
    assert "gpus_per_client" not in message
