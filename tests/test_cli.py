"""The `gdn-exp` command end to end: a tiny run writes the run directory; a user's mistake ends in one clear
line naming the key, a non-zero exit and no traceback."""
import json
import os
import subprocess
import sys

import pytest
import torch

from gdn_exp.train import run_job


def gdn_exp(tmp_path, *overrides, env=None):
    env = {**os.environ, **(env or {})}
    env.pop("TRITON_INTERPRET", None)  # the CLI must see the machine as it is: no GPU, no interpreter
    return subprocess.run([sys.executable, "-m", "gdn_exp.cli", "logger=none", "trainer.progress=false",
                           *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_tiny_run_writes_the_run_directory(tmp_path):
    proc = gdn_exp(tmp_path, "model=tiny", "task=copy", "trainer.max_steps=6", "trainer.eval_interval=3",
                   "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert (run / ".hydra/config.yaml").is_file() and (run / ".hydra/overrides.yaml").is_file()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == 6 and 0 <= results["test/accuracy"] <= 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "test/accuracy" in r] == [3, 6]
    assert torch.load(run / "checkpoints/latest.pt", weights_only=True)["counters"]["step"] == 6
    assert (tmp_path / "outputs/cache/tasks").is_dir()  # task splits cached for the next run


@pytest.mark.parametrize("overrides,message", [
    (["model.num_heads=0"], "model.num_heads=0"),           # ours: checked before training
    (["kernel.backend=triton"], "backend=triton"),          # ours: no CUDA here
    (["task=nonexistent"], "task/nonexistent"),             # Hydra: unknown group option
    (["trainer.lrr=1"], "lrr"),                             # Hydra + schema: misspelled key
    (["trainer.lr=fast"], "trainer.lr"),                    # Hydra + schema: wrong type
], ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_user_errors_give_one_clear_line(tmp_path, overrides, message):
    proc = gdn_exp(tmp_path, "model=tiny", "trainer.max_steps=1", *overrides)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in output, output
    assert "Traceback" not in output, output
    if not message.startswith(("task/", "lrr", "trainer.lr")):  # Hydra's own messages list the options
        assert [line for line in output.splitlines() if "error" in line.lower()] == [
            line for line in output.splitlines() if message in line]


@pytest.mark.parametrize("overrides,message", [
    (["model.mixer=attention", "model.d_model=130"], "model.d_model=130"),
    (["task.seq_len=10"], "seq_len=10"),
    (["task.vocab_size=2"], "vocab_size=2"),
    (["model.vocab_size=8"], "model.vocab_size=8"),
    (["kernel.mode=parallel"], "kernel.mode=parallel"),
    (["trainer.batch_size=0"], "trainer.batch_size=0"),
], ids=lambda x: " ".join(x))
def test_config_mistakes_fail_before_training_with_the_key_named(compose, tmp_path, overrides, message):
    results = run_job(compose("model=tiny", "logger=none", *overrides), tmp_path / "run")
    assert results["status"] == "failed" and results["user_error"]
    assert message in results["error"] and "\n" not in results["error"]
    assert not (tmp_path / "run/checkpoints").exists()


def test_missing_cuda_is_a_user_error(compose, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    results = run_job(compose("model=tiny", "logger=none", "trainer.device=cuda"), tmp_path / "run")
    assert results["user_error"] and "trainer.device=cuda" in results["error"]
