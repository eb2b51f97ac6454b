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
    assert "Saving the dataset" not in proc.stderr  # HF datasets' progress bars stay off


@pytest.mark.parametrize("overrides,message", [
    (["model.num_heads=0"], "model.num_heads=0"),           # ours: checked before training
    (["kernel.backend=triton"], "backend=triton"),          # ours: no CUDA here
    (["task=nonexistent"], "task/nonexistent"),             # Hydra: unknown group option
    (["trainer.lrr=1"], "trainer.lrr is not a key of trainer (did you mean trainer.lr?); its keys: max_steps"),
    (["seeed=1"], "seeed is not a top-level key or group (did you mean seed?); those are: model, task"),
    (["-m", "task.seq_lenn=8,16"], "task.seq_lenn is not a key of task (did you mean task.seq_len?)"),
    (["trainer.lr=fast"], "trainer.lr"),                    # Hydra + schema: wrong type
    (["kernel.mode=parallel"], "expected one of [chunk, recurrent]"),  # Hydra + schema: not an option
    (["trainer.device=gpu"], "trainer.device=gpu"),         # ours: picked before the other checks
    (["+trainer.foo=1"], "+trainer.foo=1"),                 # ours: Hydra lets + add a key to a typed group
    (["-m", "trainer.lr=1e-3,3e-3", "--cfg", "hydra"], "--cfg and -m do not go together"),  # Hydra: a traceback
    (["hydra.run.dir=a_file/run"], "cannot write the run directory hydra.run.dir=a_file/run"),  # before Hydra
    (["hydra.sweep.dir=a_file/sweep", "-m"], "cannot write the sweep directory hydra.sweep.dir=a_file/sweep"),
    (["hydra.run.dir="], "hydra.run.dir is empty"),        # ours: Hydra would write into the working directory
], ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_user_errors_give_one_clear_line(tmp_path, overrides, message):
    (tmp_path / "a_file").write_text("a file where the run directory's parent should be\n")
    proc = gdn_exp(tmp_path, "model=tiny", "trainer.max_steps=1", *overrides)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in output, output
    assert "Traceback" not in output, output
    if message != "trainer.lr" and not message.startswith(("task/", "expected")):  # Hydra's own messages list the options
        assert [line for line in output.splitlines() if "error" in line.lower()] == [
            line for line in output.splitlines() if message in line]


@pytest.mark.parametrize("overrides,message", [
    (["model.mixer=attention", "model.d_model=130"], "model.d_model=130"),
    (["task.seq_len=10"], "seq_len=10"),
    (["task.vocab_size=2"], "vocab_size=2"),
    (["model.vocab_size=8"], "model.vocab_size=8"),
    (["trainer.batch_size=0"], "trainer.batch_size=0"),
    (["model.norm=batchnorm"], "model.norm='batchnorm' is not one of ('rmsnorm', 'layernorm')"),
    (["model.position_embedding=learned"], "model.max_positions=None must be >= 1"),
    (["model.position_embedding=learned", "model.max_positions=4"],
     "model.max_positions=4 is shorter than task.seq_len"),
    # every impossible value of a trainer key, named with what it may be
    (["trainer.lr=-1"], "trainer.lr=-1.0 must be a finite number > 0"),
    (["trainer.lr=nan"], "trainer.lr=nan"),
    (["trainer.lr=inf"], "trainer.lr=inf"),
    (["trainer.warmup_steps=-5"], "trainer.warmup_steps=-5 must be >= 0"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0 must be >= 1"),
    (["trainer.num_threads=0"], "trainer.num_threads=0 must be >= 1 or null"),
    (["trainer.min_lr_ratio=1.5"], "trainer.min_lr_ratio=1.5 must be in [0, 1]"),
    (["trainer.min_lr_ratio=-0.1"], "trainer.min_lr_ratio=-0.1"),
    (["trainer.grad_clip=0"], "trainer.grad_clip=0.0 must be > 0"),
    (["trainer.weight_decay=-0.1"], "trainer.weight_decay=-0.1"),
    (["trainer.betas=[0.9]"], "trainer.betas=[0.9]"),
    (["trainer.betas=[0.9,1.0]"], "trainer.betas[1]=1.0 must be in [0, 1)"),
    (["trainer.target_accuracy=1.5"], "trainer.target_accuracy=1.5 must be in [0, 1] or null"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.grad_accum_steps=0"], "trainer.grad_accum_steps=0"),
    (["trainer.log_interval=0"], "trainer.log_interval=0"),
    (["trainer.eval_interval=-1"], "trainer.eval_interval=-1"),
    (["trainer.checkpoint_interval=0"], "trainer.checkpoint_interval=0"),
    (["trainer.resume=3"], "trainer.resume=3"),
    (["trainer.resume=''"], "trainer.resume=''"),
    (["trainer.device="], "trainer.device='' must be auto, cpu, cuda or cuda:N"),
    (["trainer.device=gpu"], "trainer.device=gpu must be auto, cpu, cuda or cuda:N"),
    (["trainer.device=cuda:x"], "trainer.device=cuda:x"),
    # the other groups and the top level
    (["seed=-1"], "seed=-1"),
    (["task_cache_dir=''"], "task_cache_dir"),
    (["task.num_train=0"], "task.num_train=0 must be >= 1"),
    (["task.num_test=0"], "task.num_test=0 must be >= 1"),
    (["task.num_train=4", "trainer.batch_size=8"], "task.num_train=4 is smaller than trainer.batch_size=8"),
    (["task=mqar", "task.power_a=0"], "task.power_a=0"),
    (["task=parity", "task.min_len=50"], "task.seq_len=40 is too small: need seq_len >= 50 = min_len"),
    (["task=parity", "task.test_lengths=[256,30]"],
     "task.test_lengths=[256, 30]: 30 is not longer than task.seq_len=40"),
    (["task.name=nonexistent"], "task.name=nonexistent"),
    (["task=lm", "task.path="], "task.path=''"),
    (["task=lm", "task.tokenizer="], "task.tokenizer=''"),
    (["task=lm", "task.text_field="], "task.text_field=''"),
    (["task=lm", "task.val_fraction=0"], "task.val_fraction=0"),
    (["task=lm", "task.num_test=0"], "task.num_test=0"),
    # `+` adds a key to a typed group (Hydra lets it through): refused, naming the key and the known ones
    (["+trainer.foo=1"], "+trainer.foo=1 adds a key that trainer does not have; known keys: max_steps"),
    (["+model.bar=2"], "+model.bar=2 adds a key that model does not have"),
    (["+task.baz=3"], "+task.baz=3 adds a key that task does not have; known keys: name, num_train"),
    (["task=lm", "+task.baz=3"], "+task.baz=3 adds a key that task does not have; known keys: name, path"),
    (["+kernel.x=1"], "+kernel.x=1 adds a key that kernel does not have; known keys: mode, backend"),
    (["+logger.y=1"], "+logger.y=1 adds a key that logger does not have"),
    (["+foo=1"], "+foo=1 adds a key that the top level does not have"),
], ids=lambda x: " ".join(x))
def test_config_mistakes_fail_before_training_with_the_key_named(compose, tmp_path, overrides, message):
    results = run_job(compose("model=tiny", "logger=none", *overrides), tmp_path / "run")
    assert results["status"] == "failed" and results["user_error"], results
    assert message in results["error"] and "\n" not in results["error"], results["error"]
    assert not (tmp_path / "run/checkpoints").exists()


@pytest.mark.parametrize("override,choices", [
    ("kernel.mode=parallel", "chunk, recurrent"),
    ("kernel.backend=cuda", "auto, triton, torch"),
    ("trainer.precision=fp16", "auto, fp32, bf16"),
    ("trainer.strategy=zero", "auto, none, ddp, fsdp"),
    ("logger.name=tensorboard", "wandb, none"),
    ("logger.mode=bogus", "offline, online, disabled"),
])
def test_a_string_option_is_checked_by_hydra_which_lists_the_valid_ones(compose, override, choices):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as error:
        compose("model=tiny", override)
    assert f"expected one of [{choices}" in str(error.value.__cause__), error.value.__cause__


def test_a_string_option_reaches_the_run_as_its_plain_value(compose, tmp_path):
    cfg = compose("model=tiny", "logger=none", "task=copy", "kernel.mode=recurrent", "trainer.max_steps=1")
    assert cfg.kernel.mode == "recurrent" and f"{cfg.kernel.mode}" == "recurrent"
    results = run_job(cfg, tmp_path / "run")
    assert results["status"] == "completed", results
    saved = torch.load(tmp_path / "run/checkpoints/latest.pt", weights_only=True)["config"]  # no Enum pickled
    assert saved["kernel"] == {"mode": "recurrent", "backend": "auto"} and type(saved["kernel"]["mode"]) is str
    assert "mode: recurrent" in (tmp_path / "run/config.yaml").read_text()


def test_missing_cuda_is_a_user_error(compose, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    results = run_job(compose("model=tiny", "logger=none", "trainer.device=cuda"), tmp_path / "run")
    assert results["user_error"] and "trainer.device=cuda" in results["error"]
