"""Shared test setup: without a GPU, Triton runs on CPU tensors (interpreter); wandb never reaches the network;
a `compose` fixture builds the real Hydra config with overrides and points its outputs at tmp_path."""
import os
import signal

import pytest
import torch

# The one place the interpreter is switched on, before the kernel modules are imported (Triton reads it at
# @triton.jit time): on a machine without CUDA the kernels run on CPU tensors (float32); on a GPU they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"



def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA and compiled kernels, tests marked `interpreter` the Triton interpreter: each
    kind is skipped where it cannot run."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    skips = {"gpu": None if torch.cuda.is_available() and not interpreted else
             pytest.mark.skip(reason="needs CUDA and compiled kernels (TRITON_INTERPRET unset or 0)"),
             "interpreter": None if interpreted else pytest.mark.skip(reason="needs TRITON_INTERPRET=1")}
    for item in items:
        for marker, skip in skips.items():
            if skip is not None and marker in item.keywords:
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

    from gdn_exp.cli import CONF_DIR
    from gdn_exp.config import register_configs

    register_configs()

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=[f"task_cache_dir={tmp_path / 'cache'}",
                                                      "trainer.progress=false", *overrides])

    return _compose
