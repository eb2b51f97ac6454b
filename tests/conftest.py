"""Shared test setup: Triton runs on CPU tensors (interpreter), wandb never reaches the network, and a
`compose` fixture that builds the real Hydra config with overrides and points its outputs at tmp_path."""
import os

# Before anything imports triton: its kernels then run on CPU tensors (float32).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402

from gdn_exp.config import register_configs  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register_configs()


@pytest.fixture
def compose(tmp_path):
    """compose(*overrides) -> the composed config, with the task cache under tmp_path and no progress bar."""

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=[f"task_cache_dir={tmp_path / 'cache'}",
                                                      "trainer.progress=false", *overrides])

    return _compose
