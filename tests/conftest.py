"""Shared test setup: without a GPU, Triton runs on CPU tensors (interpreter); wandb never reaches the network;
a `compose` fixture builds the real Hydra config with overrides and points its outputs at tmp_path."""
import os
import signal
from pathlib import Path

import pytest
import torch

# Before the kernel modules are imported (Triton reads this at @triton.jit time): on a machine without CUDA
# the kernels then run on CPU tensors (float32); on a GPU machine they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA and compiled kernels: skipped without them."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def clear_stop_request():
    """A stop signal is the process's for good (train.loop.StopRequest); each test starts without one."""
    yield
    from gdn_exp.train.loop import StopRequest

    StopRequest.signal = None


@pytest.fixture
def signal_during_step(monkeypatch):
    """signal_during_step(n, sig): during the n-th training step from now on, this process receives `sig` (a real
    signal, as from `kill`); undone by the returned function or at the end of the test."""
    import gdn_exp.train.step as step_module

    real_loss, calls = step_module.lm_loss, {"n": 0}

    def arm(n, sig=signal.SIGTERM):
        calls["n"] = 0

        def loss_then_signal(logits, labels, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), sig)
            return real_loss(logits, labels, **kwargs)

        monkeypatch.setattr(step_module, "lm_loss", loss_then_signal)
        return lambda: monkeypatch.setattr(step_module, "lm_loss", real_loss)

    return arm


@pytest.fixture
def compose(tmp_path):
    """compose(*overrides) -> the composed config, with the task cache under tmp_path and no progress bar."""
    from hydra import compose as hydra_compose  # here, not at import: GPU-only runs need no Hydra
    from hydra import initialize_config_dir

    from gdn_exp.config import register_configs

    register_configs()

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=[f"task_cache_dir={tmp_path / 'cache'}",
                                                      "trainer.progress=false", *overrides])

    return _compose
