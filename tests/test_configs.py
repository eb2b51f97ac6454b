"""Every config group option and experiment preset composes into a config that passes the start-up checks:
ablations alone and as lists, model families, launchers, and every grid point of every experiment sweep."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gdn_exp.cli import CONF_DIR
from gdn_exp.train import check_config
from gdn_exp.train.distributed import Distributed
from gdn_exp.train.loop import lr_multiplier

# What each ablation sets in `model` (everything else stays at the full Gated DeltaNet).
ABLATIONS = {
    "none": {},
    "no_gate": {"use_gate": False},
    "no_delta": {"use_delta": False},
    "no_conv": {"use_short_conv": False},
    "no_output_gate": {"use_output_gate": False},
    "no_qk_norm": {"use_qk_l2norm": False},
    "neg_eigval": {"allow_neg_eigval": True},
    "no_beta": {"use_beta": False},
    "attention": {"mixer": "attention"},
    "gla": {"use_delta": False, "use_beta": False},  # and decay: channel
    "zoology_attention": {"mixer": "attention"},  # and its form: tests/test_model.py
}
ONE_CPU_PROCESS = Distributed(rank=0, world_size=1, device=torch.device("cpu"), strategy="none")
FULL_MODEL = {"mixer": "gdn", "use_gate": True, "use_delta": True, "use_short_conv": True, "use_output_gate": True,
              "use_qk_l2norm": True, "allow_neg_eigval": False, "use_beta": True}


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def compose_with_hydra(*overrides, return_hydra_config=True):
    """The composed config, by default with its `hydra` node (launcher, sweeper)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def model_fields(cfg) -> dict:
    return {key: cfg.model[key] for key in FULL_MODEL}


def test_every_ablation_file_is_listed():
    assert options("ablation") == sorted(ABLATIONS)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_sets_its_model_fields(compose, name):
    cfg = compose(f"ablation={name}")
    assert model_fields(cfg) == {**FULL_MODEL, **ABLATIONS[name]}
    check_config(cfg, ONE_CPU_PROCESS)


@pytest.mark.parametrize("names", [["no_conv", "no_output_gate"], ["no_gate", "no_delta", "no_beta"],
                                   ["neg_eigval", "no_qk_norm"]], ids="+".join)
def test_ablations_compose_as_a_list(compose, names):
    cfg = compose(f"ablation=[{','.join(names)}]")
    expected = dict(FULL_MODEL)
    for name in names:
        expected.update(ABLATIONS[name])
    assert model_fields(cfg) == expected
    check_config(cfg, ONE_CPU_PROCESS)


@pytest.mark.parametrize("group", ["model", "task", "kernel", "trainer", "logger"])
def test_every_group_option_composes_and_passes_checks(compose, group):
    for option in options(group):
        cfg = compose(f"{group}={option}")
        check_config(cfg, ONE_CPU_PROCESS)
        if group in ("model", "task"):
            assert cfg[group].name == option


@pytest.mark.parametrize("overrides", [["+experiment=mqar_smoke"], ["+experiment=length_smoke"],
                                       ["task=mqar", "+mqar_length=len64"], ["++trainer.lr=1e-2"]], ids=" ".join)
def test_additions_of_whole_options_pass_the_key_check(compose, overrides):
    """`+group=option` adds a defaults entry, not a key: the check that refuses `+trainer.foo=1` lets it be."""
    check_config(compose(*overrides), ONE_CPU_PROCESS)


@pytest.mark.parametrize("name, layer_mixers, window", [
    ("transformer_small", ["attention", "attention"], None),
    ("hybrid_medium", ["gdn", "attention", "gdn", "attention"], None),
    ("hybrid_swa_medium", ["gdn", "attention", "gdn", "attention"], 64),
])
def test_model_families(compose, name, layer_mixers, window):
    from gdn_exp.model import ModelConfig

    model = ModelConfig(**OmegaConf.to_container(compose(f"model={name}").model, resolve=True))
    assert model.layer_mixers() == layer_mixers and model.attention_window == window


def test_local_launcher_is_ours_with_configurable_jobs():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    launcher = compose_with_hydra("hydra/launcher=local", "hydra.launcher.n_jobs=3",
                                  "hydra.launcher.jobs_per_gpu=6").hydra.launcher
    assert launcher._target_.endswith("LocalLauncher") and (launcher.n_jobs, launcher.jobs_per_gpu) == (3, 6)
    assert "LocalLauncher" in [plugin.__name__ for plugin in Plugins.instance().discover(Launcher)]


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    launcher = compose_with_hydra("hydra/launcher=slurm").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1


def sweep_axes(hydra_cfg) -> dict:
    """{key: [values]} of hydra.sweeper.params, typed as Hydra reads them (a single value is a one-point axis)."""
    parser = OverridesParser.create()
    overrides = [parser.parse_override(f"{key}={value}") for key, value in hydra_cfg.sweeper.params.items()]
    return {o.key_or_group: list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()] for o in overrides}


def grid_configs(name: str):
    """Every grid point of experiment `name`'s sweep as ({key: value}, config): one composition per setting of
    the config-group axes (ablation, task), with the value axes then set in place (composing 768 times is too
    slow); each config is valid until the next one is yielded."""
    axes = sweep_axes(compose_with_hydra(f"+experiment={name}").hydra)
    group_axes = {key: values for key, values in axes.items() if (CONF_DIR / key).is_dir()}
    value_axes = {key: values for key, values in axes.items() if key not in group_axes}
    for group_choice in itertools.product(*group_axes.values()):
        group_overrides = [f"{key}={value}" for key, value in zip(group_axes, group_choice)]
        cfg = compose_with_hydra(f"+experiment={name}", *group_overrides, return_hydra_config=False)
        for value_choice in itertools.product(*value_axes.values()):
            for key, value in zip(value_axes, value_choice):
                OmegaConf.update(cfg, key, value)
            yield dict(zip(group_axes, group_choice)) | dict(zip(value_axes, value_choice)), cfg


EXPERIMENTS = {  # name: (task, number of grid points, launcher)
    "mqar_grid": ("mqar", 576, "LocalLauncher"),
    "mqar_quick": ("mqar", 72, "LocalLauncher"),
    "mqar_hard": ("mqar", 72, "LocalLauncher"),
    "mqar_zoology_attention": ("mqar", 192, "LocalLauncher"),
    "mqar_smoke": ("mqar", 32, "LocalLauncher"),
    "length_grid": ("copy", 64, "LocalLauncher"),
    "length_smoke": ("copy", 24, "LocalLauncher"),
}
STATE_TRACKING_EXPERIMENTS = {"parity_negeig": 12, "parity_negeig_smoke": 2}  # name: number of grid points
ZOOLOGY_LENGTHS = {64: (4, 512), 128: (8, 512), 256: (16, 256), 512: (64, 128)}  # seq_len: (pairs, batch)


def test_every_experiment_is_listed():
    assert options("experiment") == sorted([*EXPERIMENTS, *STATE_TRACKING_EXPERIMENTS])


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_preset_composes(name):
    task, num_points, launcher = EXPERIMENTS[name]
    cfg = compose_with_hydra(f"+experiment={name}")
    assert cfg.task.name == task and cfg.model.n_layers == 2
    assert cfg.hydra.launcher._target_.endswith(launcher)
    axes = sweep_axes(cfg.hydra)
    assert {"ablation", "trainer.lr"} <= axes.keys()
    mixers = {"zoology_attention"} if name == "mqar_zoology_attention" else {"none", "no_delta", "no_gate", "attention"}
    assert set(axes["ablation"]) == mixers
    if name.startswith("mqar"):
        assert "model.d_model" in axes and ("mqar_length" in axes or "task.seq_len" in axes)
        assert cfg.model.num_heads == 1 and cfg.model.head_dim == cfg.model.d_model
    else:
        assert set(axes["task"]) == {"copy", "reverse"} and "task.seq_len" in axes
        assert cfg.task.copy_len == cfg.task.seq_len // 2
    if name.endswith("smoke"):
        assert cfg.trainer.num_threads == 1 and cfg.trainer.progress is False


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_grid_point_passes_start_up_checks(name):
    points = 0
    for point, cfg in grid_configs(name):
        check_config(cfg, ONE_CPU_PROCESS)
        mixer = "attention" if point["ablation"].endswith("attention") else "gdn"
        assert cfg.model.mixer == mixer, point
        assert cfg.model.use_gate == (point["ablation"] != "no_gate"), point
        assert cfg.model.use_delta == (point["ablation"] != "no_delta"), point
        for key, value in point.items():
            if "." in key:
                assert OmegaConf.select(cfg, key) == value, (point, key)
        if "mqar_length" in point:  # Zoology's pairs and batch size per length, in the full grid and its prefixes
            pairs, batch = ZOOLOGY_LENGTHS[cfg.task.seq_len]
            assert point["mqar_length"] == f"len{cfg.task.seq_len}" and cfg.task.num_kv_pairs == pairs, point
            assert cfg.trainer.batch_size == batch, point
        points += 1
    assert points == EXPERIMENTS[name][1]


@pytest.mark.parametrize("name", sorted(STATE_TRACKING_EXPERIMENTS))
def test_parity_presets_sweep_the_beta_range_and_are_tested_longer_than_trained(name):
    points = set()
    for point, cfg in grid_configs(name):
        check_config(cfg, ONE_CPU_PROCESS)
        assert cfg.task.name == "parity" and min(cfg.task.test_lengths) > cfg.task.seq_len
        assert cfg.trainer.lr_decay_steps == cfg.trainer.max_steps and cfg.trainer.target_accuracy == 0.99
        assert not cfg.model.use_output_gate and cfg.model.mixer == "gdn"
        points.add((cfg.model.allow_neg_eigval, cfg.model.use_gate, cfg.seed))
    assert {neg_eigval for neg_eigval, _, _ in points} == {False, True}
    assert len(points) == STATE_TRACKING_EXPERIMENTS[name]


CLAIMS = ("mqar_grid", "mqar_hard", "mqar_zoology_attention")  # presets whose results are reported as findings


@pytest.mark.parametrize("name", CLAIMS)
def test_presets_that_make_a_claim_run_three_seeds(name):
    assert len(sweep_axes(compose_with_hydra(f"+experiment={name}").hydra).get("seed", [])) >= 3


@pytest.mark.parametrize("length", ["len64", "len128", "len256"])
def test_the_quick_mqar_grid_is_a_prefix_of_the_full_one(length):
    """mqar_quick only stops earlier: at step 1000 (and every step) its learning rate and batch are mqar_grid's."""
    grid, quick = (compose_with_hydra(f"+experiment={name}", f"mqar_length={length}", return_hydra_config=False)
                   for name in ("mqar_grid", "mqar_quick"))
    assert quick.trainer.max_steps < grid.trainer.max_steps

    def lr_at(step, trainer):
        return trainer.lr * lr_multiplier(step, warmup_steps=trainer.warmup_steps, min_lr_ratio=trainer.min_lr_ratio,
                                          decay_steps=trainer.lr_decay_steps or trainer.max_steps)

    assert lr_at(1000, quick.trainer) == lr_at(1000, grid.trainer) < quick.trainer.lr
    keys = ("lr", "batch_size", "warmup_steps", "min_lr_ratio", "lr_decay_steps", "weight_decay", "grad_clip")
    assert {k: quick.trainer[k] for k in keys} == {k: grid.trainer[k] for k in keys}
    assert quick.model == grid.model and quick.task == grid.task


@pytest.mark.slow
@pytest.mark.parametrize("name, one_point", [
    ("mqar_smoke", ["ablation=no_delta", "model.d_model=32", "task.seq_len=32", "trainer.lr=1e-2"]),
    ("length_smoke", ["task=reverse", "task.seq_len=8", "ablation=attention"]),
    ("parity_negeig_smoke", ["model.allow_neg_eigval=true"]),
])
def test_smoke_experiment_runs_through_the_cli(tmp_path, name, one_point):
    """One grid point of the preset, 4 steps, through `gdn-exp -m` and its parallel launcher."""
    done = subprocess.run([sys.executable, "-m", "gdn_exp.cli", "-m", f"+experiment={name}", f"hydra.sweep.dir={tmp_path}",
                           *one_point, "logger=none", "trainer.max_steps=4", "trainer.eval_interval=2",
                           f"task_cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = [json.loads(path.read_text()) for path in tmp_path.glob("*/results.json")]
    assert [(r["status"], r["steps"]) for r in results] == [("completed", 4)]


def test_the_config_reference_is_up_to_date():
    """docs/config.md is what `python -m gdn_exp.dev.config_reference` prints: regenerate it after changing a
    config dataclass or a group's options."""
    from gdn_exp.dev.config_reference import reference

    assert (Path(__file__).resolve().parents[1] / "docs/config.md").read_text() == reference()
