"""Look inside a Gated DeltaNet and its no_delta ablation trained on MQAR: the script form of look_inside.ipynb.

    python examples/look_inside.py                   # trains both on this CPU (minutes), then looks inside them
    python examples/look_inside.py --fast            # a few steps of a tiny model: checks that everything runs

Writes OUT/gdn/ and OUT/no_delta/ (run directories; a completed one is not trained again) and
OUT/analysis/index.md with every figure of `gdn-exp-analyze OUT/gdn OUT/no_delta --out OUT/analysis`.
"""
import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir

from gdn_exp import analyze
from gdn_exp.analyze import cli, views
from gdn_exp.cli import CONF_DIR
from gdn_exp.train import run_job

# MQAR with 8 key-value pairs in 64 tokens of a 64-token vocabulary, a 2-layer model of width 128 (2 heads of 64):
# no_delta reaches 99 % test accuracy (where training stops) in 350 steps, GDN in 600
SETTINGS = ["model=small", "task=mqar", "task.seq_len=64", "task.num_kv_pairs=8", "task.vocab_size=64",
            "trainer.max_steps=1000"]
FAST = ["model=tiny", "task=mqar", "task.seq_len=32", "task.num_kv_pairs=4", "task.vocab_size=32",
        "task.num_train=256", "task.num_test=64", "trainer.max_steps=6", "trainer.eval_interval=3"]
MODELS = {"gdn": "none", "no_delta": "no_delta"}  # run directory -> ablation


def train(run_dir: Path, overrides: list) -> dict:
    """Composes conf/ with `overrides`, as `gdn-exp` would, and trains into run_dir; returns its results.json."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return run_job(cfg, run_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/look_inside"), help="output directory")
    parser.add_argument("--fast", action="store_true", help="a few steps of a tiny model (CI)")
    args = parser.parse_args(argv)
    settings = FAST if args.fast else SETTINGS
    for name, ablation in MODELS.items():
        results = train(args.out / name, [*settings, f"ablation={ablation}", "logger=none", "trainer.progress=false",
                                          f"task_cache_dir={args.out / 'cache'}"])
        print(f"{name}: test accuracy {results['test/accuracy']:.3f} after {results['steps']} steps")

    # In numbers, what the figures show, per layer and head: the share of the queries whose largest weight A[t, s] is
    # on their key's value, the mean share of |A| there, the median memory length 1 / (1 - alpha), and the median
    # write strength beta at the keys and at the values of the pairs.
    for name in MODELS:
        run = analyze.load_run(args.out / name)
        batch = run.examples(16)
        sources = analyze.answer_sources(run.config["task"], batch["input_ids"], batch["labels"])["source"]
        pairs = views.recall_context(run.config["task"], batch["input_ids"].shape[1])
        for layer in run.trace(batch).layers:
            A = layer.attention()                                              # [B, H, T, T]
            hits, _ = views.alignment(A, sources)
            share = views.profile_around(A, sources, width=0)[:, 0]
            memory = layer.memory_length.flatten(0, 1).median(0).values      # [H]
            beta = layer.beta[:, :pairs]                                       # [B, 2 pairs, H]: key, value, key, ...
            for h in range(layer.num_heads):
                print(f"{name:>9} layer {layer.index} head {h}: argmax on the value {hits[h]:4.0%}, |A| there "
                      f"{share[h]:4.0%}, median memory {memory[h]:8.3g} tokens, beta at keys "
                      f"{beta[:, 0::2, h].median():.2f}, at values {beta[:, 1::2, h].median():.2f}")

    cli.main([str(args.out / name) for name in MODELS]
             + ["--out", str(args.out / "analysis"), "--examples", "1" if args.fast else "4",
                "--eval-examples", "64" if args.fast else "1000"])


if __name__ == "__main__":
    main()
