"""Long-context evaluation: models trained at length L, tested at 2x, 4x, ... L (up to 32K tokens) on their task.

    python -m gdn_exp.longcontext outputs/runs/RUN_A outputs/runs/RUN_B --out outputs/longcontext
    python -m gdn_exp.longcontext a/longcontext.json b/longcontext.json --out merged   # combine earlier results

Each run dir's checkpoint (best.pt, else latest.pt) names its model and task. The task is regenerated from
test-split seeds at every evaluation length; what grows with the length is what makes the task long:
copy/reverse copy a string that long (copy_len scales with seq_len), selective_copy spreads its tokens over
more noise, mqar puts its queries farther from the pairs, needle hides its needles in a longer haystack.
The model reads each sequence chunk by chunk, carrying its cache (Gated DeltaNet: recurrent and conv
state; attention: keys and values), so memory grows with the chunk for GDN layers, not with the length.

Writes longcontext.json (one row per run and length), longcontext.md (accuracy table) and longcontext.png
(accuracy vs evaluation length, one line per model, one panel per task).
"""
import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import torch

import tasks
from gdn_exp import tables
from gdn_exp.data import task_params
from gdn_exp.extras import have, missing
from gdn_exp.model import GDN_SWITCHES, LanguageModel, ModelConfig
from gdn_exp.train import checkpoint
from gdn_exp.train.threads import auto_threads
from tasks import IGNORE_INDEX

MAX_LENGTH = 32768


def model_label(model_cfg: dict) -> str:
    """A short name for the model: its mixer (gdn, attention, gdn+attention/4 for a hybrid), switched-off
    components and width: `gdn [use_gate=False], d_model 64`."""
    defaults = ModelConfig()
    if model_cfg["mixer"] == "attention":
        label = "attention"
    elif model_cfg.get("attention_every"):
        label = f"gdn+attention/{model_cfg['attention_every']}"
    else:
        label = "gdn"
    if model_cfg.get("attention_window") and "attention" in label:
        label += f" (window {model_cfg['attention_window']})"
    changed = [f"{flag}={model_cfg[flag]}" for flag in GDN_SWITCHES
               if "gdn" in label and model_cfg.get(flag, getattr(defaults, flag)) != getattr(defaults, flag)]
    label += f" [{', '.join(changed)}]" if changed else ""
    return label + (f", d_model {model_cfg['d_model']}" if "d_model" in model_cfg else "")


def load_run(run_dir: Path) -> tuple[LanguageModel, dict]:
    """The trained model (eval mode, on CPU) and the resolved config of a run dir (`checkpoint.load_weights`)."""
    return model_of(checkpoint.load_weights(run_dir)[1])


def model_of(state: dict) -> tuple[LanguageModel, dict]:
    """The model (eval mode, on CPU) and the resolved config of a checkpoint's contents."""
    config = state["config"]
    model = LanguageModel(ModelConfig(**config["model"]), mode=config["kernel"]["mode"],
                          backend=config["kernel"]["backend"])
    model.load_state_dict(state["model"])
    return model.eval(), config


@torch.no_grad()
def chunked_accuracy(model: LanguageModel, input_ids, labels, *, chunk_size: int, batch_size: int) -> dict:
    """Token accuracy on scored positions and whole-example exact match of input_ids, labels [N, T], reading
    each row in chunks of chunk_size tokens with the cache carried between chunks."""
    correct = scored = exact = 0
    for start in range(0, len(input_ids), batch_size):
        x, y = input_ids[start : start + batch_size], labels[start : start + batch_size]
        row_correct = torch.zeros(len(x), dtype=torch.long)
        cache = None
        for t in range(0, x.shape[1], chunk_size):
            logits, cache = model(x[:, t : t + chunk_size], cache=cache, use_cache=True)
            y_chunk = y[:, t : t + chunk_size]
            row_correct += ((logits.argmax(-1) == y_chunk) & (y_chunk != IGNORE_INDEX)).sum(1)
        row_scored = (y != IGNORE_INDEX).sum(1)
        correct += row_correct.sum().item()
        scored += row_scored.sum().item()
        exact += (row_correct == row_scored).sum().item()
    return {"accuracy": correct / max(scored, 1), "exact_match": exact / max(len(input_ids), 1)}


def evaluate_run(run_dir: Path, factors: list, *, max_length: int, num_examples: int, token_budget: int,
                 chunk_size: int, batch_size: int) -> list:
    """One row per evaluation length (factor x training length, up to max_length): the run's model on its own
    task at that length, with at most min(num_examples, token_budget // length) examples."""
    model, config = load_run(run_dir)
    task = config["task"]
    name, params = task["name"], task_params(task)
    rows = []
    for length in (params["seq_len"] * f for f in factors if params["seq_len"] * f <= max_length):
        n = max(1, min(num_examples, token_budget // length))
        batch = tasks.make_task(name, seed=tasks.task_seed(config["seed"], "test"), num_examples=n,
                                **tasks.at_length(name, length, **params))
        scores = chunked_accuracy(model, batch["input_ids"], batch["labels"], chunk_size=chunk_size,
                                  batch_size=batch_size)
        rows.append({"run_dir": str(run_dir), "label": model_label(config["model"]), "task": name,
                     "train_length": params["seq_len"], "length": length, "num_examples": n, **scores})
        print(f"{rows[-1]['label']:>28} {name:>14} L={length:>6}: accuracy {scores['accuracy']:.3f} "
              f"({n} examples)", flush=True)
    return rows


def accuracy_table(rows: list) -> str:
    """Accuracy per run (task, model, training length) row and evaluation-length column."""
    lengths = sorted({r["length"] for r in rows})
    lines = []
    for key in dict.fromkeys((r["task"], r["label"], r["train_length"], r["run_dir"]) for r in rows):
        accuracy = {r["length"]: r["accuracy"] for r in rows
                    if (r["task"], r["label"], r["train_length"], r["run_dir"]) == key}
        lines.append([key[0], key[1], f"{key[2]:,}"] + [f"{accuracy[n]:.3f}" if n in accuracy else "" for n in lengths])
    return tables.markdown_table(["task", "model", "train L"] + [f"{n:,}" for n in lengths], lines) + "\n"


def plot(rows: list, path: Path) -> None:
    """Accuracy vs evaluation length (log2 axis), one panel per task, one line per trained model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in rows))
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(r["label"] for r in rows))}  # same in every panel
    fig, axes = plt.subplots(1, len(task_names), figsize=(5 * len(task_names), 3.8), squeeze=False)
    for ax, task_name in zip(axes[0], task_names):
        task_rows = [r for r in rows if r["task"] == task_name]
        for label, run_dir in dict.fromkeys((r["label"], r["run_dir"]) for r in task_rows):
            # one line per trained model: same colour per model label, the legend names each label once
            points = sorted((r["length"], r["accuracy"]) for r in task_rows if r["run_dir"] == run_dir)
            shown = label in ax.get_legend_handles_labels()[1]
            ax.plot(*zip(*points), marker="o", label=None if shown else label, color=colors[label])
        for train_length in {r["train_length"] for r in task_rows}:
            ax.axvline(train_length, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task_name} (dotted: training length)")
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="gdn-exp run directories (with checkpoints/), or longcontext.json files of earlier calls")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                        help="evaluation lengths as multiples of each run's training length")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="skip longer evaluation lengths")
    parser.add_argument("--num-examples", type=int, default=64, help="examples per length (at most)")
    parser.add_argument("--token-budget", type=int, default=2 ** 19,
                        help="at most this many tokens per length: fewer examples at long lengths")
    # attention scores of one call take batch x heads x chunk x length floats: 0.5 GB at 32K with 2 heads
    parser.add_argument("--chunk-size", type=int, default=512, help="tokens per forward call")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward call")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: half the available cores, as trainer.num_threads=null)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: outputs/longcontext/<date>_<time>, a new one per call)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("outputs/longcontext") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    torch.set_num_threads(args.threads or auto_threads())
    rows = []
    for run in args.runs:
        if run.suffix == ".json":
            rows += json.loads(run.read_text())
            continue
        try:
            rows += evaluate_run(run, args.factors, max_length=args.max_length, num_examples=args.num_examples,
                                 token_budget=args.token_budget, chunk_size=args.chunk_size,
                                 batch_size=args.batch_size)
        except ValueError as e:  # no readable checkpoint
            sys.exit(f"gdn-exp-longeval: error: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "longcontext.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "longcontext.md").write_text(accuracy_table(rows))
    if have("matplotlib"):
        plot(rows, args.out / "longcontext.png")
    else:
        print(missing("matplotlib", "the plot"), file=sys.stderr)
    print(accuracy_table(rows) + f"-> {args.out}/longcontext.{{json,md{',png' if have('matplotlib') else ''}}}")


if __name__ == "__main__":
    main()
