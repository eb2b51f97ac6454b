"""`gdn-exp-analyze`: look inside trained models (implicit attention, state, gates) as PNGs linked from one index.md.

    gdn-exp-analyze outputs/runs/<run dir>                      # -> <run dir>/analysis/index.md
    gdn-exp-analyze outputs/multiruns/<sweep> --out look/       # a page per run in look/<job>/, comparisons in look/

Each run's model (checkpoints/best.pt, else latest.pt) reads test examples 0..N-1 of its own test split
(--examples N) with every layer's op inputs recorded; from them, in float64:

    attention_example<i>.png    per layer and head, the implicit attention A[t, s] of GDN layers and the softmax
                                map of attention layers (circles: where each scored token's answer comes from)
    state.png                   per GDN layer and head, the state's norm, effective rank and per-step rewrite
    gates.png                   per GDN layer and head, the distributions of α = exp(g), β and 1 / (1 − α)
    recall.png                  mqar, needle: what each query reads from the key-value pairs
    alignment.png, profile.png  tasks with a known answer position (mqar, needle, copy, reverse, selective_copy):
                                argmax_s A[t, s] against it, and the share of |A| around it
    accuracy_by_distance.png    the same tasks, on up to --eval-examples test examples
    loss_by_position.png        task=lm
    index.md                    all of them, with what each shows and a table per head

Several runs (a sweep directory or several PATHs) also get comparisons in --out: the training curves, test example
0 and the recall maps under every run, accuracy by distance and the gates, a line or a row of panels per run.
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gdn_exp import report, tables
from gdn_exp.data import task_params, task_source
from gdn_exp.extras import have, missing
from gdn_exp.ops import KernelUnavailableError
from gdn_exp.train.threads import auto_threads

from tasks import IGNORE_INDEX

from . import figures, frames, views
from .runs import Run, load_run

PROFILE_WIDTH = 6       # offsets −6..6 around the answer's source in profile.png
MAX_COMPARED = 8        # runs in the comparison of maps (one row each)


@dataclass
class Analysis:
    """One run's analysis: what its page shows and what the comparisons across runs need."""

    name: str                         # its page's directory under --out
    label: str
    run: Run
    trace: object                     # runs.Trace of the analysed examples
    maps: list                        # [B, H, T, T] per layer
    sources: dict                     # `views.answer_sources` of the examples
    hit_rates: dict = field(default_factory=dict)  # layer -> [H]: share of argmax_s A[t, s] on the source
    recall: list = field(default_factory=list)     # `views.recall_rows` per layer (mqar, needle)
    distance: dict = field(default_factory=dict)   # `views.accuracy_by_distance`
    loss: object = None               # `views.loss_by_position` (task=lm)

    @property
    def title(self) -> str:
        return f"{self.label}: {describe_task(self.run.config['task'])}"

    @property
    def best_head(self) -> tuple:
        """(layer, head, hit rate) of the head whose argmax most often lands on the source; () without sources."""
        return max(((i, h, rate.item()) for i, hits in self.hit_rates.items() for h, rate in enumerate(hits)),
                   key=lambda best: best[2], default=())


def describe_task(task: dict) -> str:
    return f"{task['name']} ({', '.join(f'{k}={v}' for k, v in task_params(task).items() if v is not None)})"


def describe_run(a: Analysis) -> list:
    run, trace = a.run, a.trace
    m = run.config["model"]
    kinds = ", ".join(layer.kind for layer in trace.layers)
    scored = trace.labels != IGNORE_INDEX
    return [f"# Look inside: {a.label}", "",
            f"Run `{run.path}`, weights `checkpoints/{run.checkpoint}`: {run.label}, d_model {m['d_model']}, "
            f"{m['n_layers']} layers ({kinds}), {run.model.num_params():,} parameters. Task "
            f"{describe_task(run.config['task'])}; test examples 0-{len(trace.input_ids) - 1} of the run's own test "
            f"split (seed {run.config['seed']}), of whose scored tokens the model gets {trace.correct.sum()} of "
            f"{scored.sum()} right.", ""]


def map_section(a: Analysis, out: Path) -> list:
    """attention_example<i>.png and the reconstruction check."""
    lines = ["## Implicit attention", "",
             "A[t, s]: the weight with which token s's value reaches token t's output (GDN: scale q_tᵀ Π_{r=s+1..t} "
             "α_r(I − β_r k_r k_rᵀ) β_s k_s; no_delta: scale (q_t·k_s) β_s Π α_r; attention layers: the softmax "
             "map). Rows of panels: layers; columns: heads; red > 0 > blue."
             + (" Black circles: where each scored token's answer comes from" if a.sources else "")
             + ("; green crosses: the queried key." if "key" in a.sources else "." if a.sources else ""), ""]
    for i in range(len(a.trace.input_ids)):
        figures.attention_maps(a.trace.layers, [A[i] for A in a.maps], {k: pos[i] for k, pos in a.sources.items()},
                               out / f"attention_example{i}.png", f"{a.label}: test example {i}")
        lines += [f"![implicit attention, example {i}](attention_example{i}.png)", ""]
    errors = ", ".join(f"layer {layer.index} {layer.reconstruction_error(A):.1e}"
                       for layer, A in zip(a.trace.layers, a.maps))
    return lines + ["Check: Σ_s A[t, s] v_s against the layer's output computed without A (GDN: the token-by-token "
                    f"float64 oracle; attention: SDPA), max error relative to max |o|: {errors}.", ""]


def source_section(a: Analysis, out: Path, eval_examples: int) -> list:
    """recall.png (mqar, needle), alignment.png, profile.png and accuracy_by_distance.png."""
    source, recall = a.sources["source"], "key" in a.sources
    alignments = [views.alignment(A, source) for A in a.maps]
    a.hit_rates = {layer.index: hits for layer, (hits, _) in zip(a.trace.layers, alignments)}
    lines = ["## Where the answers come from", ""]
    if recall:
        context = views.recall_context(a.run.config["task"], source.shape[1])
        a.recall = [views.recall_rows(A, a.sources, context) for A in a.maps]
        figures.recall_maps([(a.label, a.trace.layers, a.recall)], out / "recall.png", a.title)
        lines += ["What each query reads from the key-value pairs: a row per query of the examples, a column per "
                  "position among the pairs, A[t, s] scaled by the row's largest |A|; crosses: the query's key, "
                  "circles: its value.", "", "![recall](recall.png)", ""]
    figures.alignment(a.trace.layers, [argmax for _, argmax in alignments], [hits for hits, _ in alignments], source,
                      out / "alignment.png", a.title)
    figures.profiles(a.trace.layers, [views.profile_around(A, source, PROFILE_WIDTH) for A in a.maps],
                     PROFILE_WIDTH, recall, out / "profile.png", a.title)
    lines += ["Each scored position's argmax_s A[t, s] against the position its answer comes from"
              + (" (the queried key's value)" if recall else "") + " (black crosses); green: on it.", "",
              "![alignment](alignment.png)", "",
              "The mean share |A[t, s]| / Σ_s |A[t, s]| at offsets around that position"
              + (" (0: the value, −1: the key)" if recall else "") + ".", "",
              "![profile around the source](profile.png)", ""]
    a.distance = views.accuracy_by_distance(a.run, eval_examples)
    distances = np.unique(a.distance["distance"])
    positions = f"the first {len(a.distance['correct'])} scored positions of the test split"
    if len(distances) == 1:  # copy: every answer is copy_len tokens after its source
        return lines + [f"Every answer is {distances[0]} tokens after its source; accuracy "
                        f"{a.distance['correct'].mean():.4f} over {positions}.", ""]
    figures.accuracy_by_distance({a.label: a.distance}, recall, out / "accuracy_by_distance.png", a.title)
    return lines + [f"Accuracy by distance{' (query to key)' if recall else ''} over {positions}.", "",
                    "![accuracy by distance](accuracy_by_distance.png)", ""]


def state_section(a: Analysis, out: Path) -> list:
    """state.png and gates.png of the GDN layers."""
    gdn = [layer for layer in a.trace.layers if layer.kind == "gdn"]
    scored = (a.trace.labels[0] != IGNORE_INDEX).nonzero()
    answer_start = int(scored[0]) if len(scored) else -1
    figures.state_over_time(gdn, [layer.state_statistics() for layer in gdn], answer_start, out / "state.png",
                            f"{a.label}: state over time, mean over {len(a.trace.input_ids)} examples")
    figures.gates(gdn, out / "gates.png", f"{a.label}: gates over {a.trace.input_ids.numel()} tokens")
    return ["## State over time", "",
            "Per GDN layer (columns) and head (lines), mean over the examples: ‖S_t‖_F; the effective rank "
            "exp(entropy of σ/Σσ) of S_t; update ‖S_t − α_t S_{t−1}‖ / ‖α_t S_{t−1}‖ (how much a step rewrites "
            "what the gate kept); erased ‖β_t k_t k_tᵀ α_t S_{t−1}‖ / ‖α_t S_{t−1}‖ (the share the delta rule "
            "removes before writing; 0 without it). Dotted: the first scored position of example 0.", "",
            "![state](state.png)", "",
            "## Gates", "",
            "Distributions over the examples' tokens of α = exp(g) (the decay per token), β (the write strength) and "
            "the memory length 1 / (1 − α), in tokens.", "",
            "![gates](gates.png)", ""]


def head_table(a: Analysis) -> list:
    rows = []
    for layer in a.trace.layers:
        mixer = layer.kind + ("" if layer.kind == "attention" or layer.use_delta else " (no delta)")
        for h in range(layer.num_heads):
            row = [str(layer.index), mixer, str(h), f"{a.hit_rates[layer.index][h]:.0%}" if a.hit_rates else ""]
            if layer.kind == "gdn":
                alpha, beta = layer.alpha[..., h], layer.beta[..., h]
                row += [f"{alpha.median():.3f}", f"{layer.memory_length[..., h].median():.3g}", f"{beta.median():.3f}"]
            rows.append(row + [""] * (7 - len(row)))
    return ["## Per head", "", tables.markdown_table(["layer", "mixer", "head", "argmax on source", "median α",
                                                      "median memory length", "median β"], rows), ""]


def analyze_run(run: Run, name: str, label: str, out: Path, *, num_examples: int, eval_examples: int) -> Analysis:
    """Draws one run on its first num_examples test examples into `out`, with its index.md."""
    out.mkdir(parents=True, exist_ok=True)
    batch = run.examples(num_examples)
    trace = run.trace(batch)
    a = Analysis(name, label, run, trace, maps=[layer.attention() for layer in trace.layers],
                 sources=views.answer_sources(run.config["task"], batch["input_ids"], batch["labels"]))
    lines = describe_run(a) + map_section(a, out)
    if a.sources:
        lines += source_section(a, out, eval_examples)
    if task_source(run.task).text:
        a.loss = views.loss_by_position(run)
        figures.loss_by_position({label: a.loss}, out / "loss_by_position.png", f"{label}: test loss")
        lines += ["## Loss by position", "", "![loss by position](loss_by_position.png)", ""]
    if any(layer.kind == "gdn" for layer in trace.layers):
        lines += state_section(a, out)
    (out / "index.md").write_text("\n".join(lines + head_table(a)))
    a.maps = [A[:1] for A in a.maps]  # the comparisons draw example 0 only, and a sweep holds many runs
    return a


def run_labels(run_dirs: list) -> dict:
    """{run dir: label}: the parameters that differ between the runs (`gdn-exp-report`'s columns), else the run
    directory's name."""
    runs = [report.load_run(run_dir) for run_dir in run_dirs]
    swept = report.swept_keys(runs)
    return {run.path: report.label(run, swept) if swept else run.path.name for run in runs}


def compare(analyses: list, title: str, out: Path, skipped: list) -> str:
    """Comparison figures of several runs in `out`; returns the top index.md."""
    first = analyses[0]
    same_task = all((a.run.config["task"], a.run.config["seed"]) == (first.run.config["task"], first.run.config["seed"])
                    for a in analyses)
    lines = [f"# Look inside: {title}", "",
             f"{len(analyses)} runs analysed" + (f", {len(skipped)} skipped (no checkpoint)" if skipped else "")
             + "; each run's own page is linked.", ""]
    table = []
    for a in analyses:
        best = f"layer {a.best_head[0]} head {a.best_head[1]}: {a.best_head[2]:.0%}" if a.best_head else ""
        table.append([f"[{a.label}]({a.name}/index.md)", a.run.label,
                      report.format_cell(report.load_run(a.run.path).results.get("test/accuracy")),
                      f"{a.run.model.num_params():,}", best])
    lines += [tables.markdown_table(["run", "model", "test/accuracy", "parameters", "best head: argmax on source"],
                                    table), ""]
    if skipped:
        lines += ["Skipped: " + "; ".join(f"`{path}`: {why}" for path, why in skipped), ""]

    try:
        import pandas as pd
    except ImportError:
        lines += ["(The training curves need pandas: `pip install -e \".[analyze]\"`.)", ""]
    else:
        metrics = pd.concat([frames.metrics(a.run.path).assign(run=a.label) for a in analyses])
        if len(metrics):
            figures.training_curves(metrics, out / "curves.png", "training")
            lines += ["## Training", "", "![training curves](curves.png)", ""]

    if same_task:
        compared = analyses[:MAX_COMPARED]
        figures.attention_comparison([(a.label, a.trace.layers, [A[0] for A in a.maps]) for a in compared],
                                     {key: pos[0] for key, pos in first.sources.items()}, out / "attention.png",
                                     f"test example 0: {describe_task(first.run.config['task'])}")
        lines += ["## The same test example under each run", "",
                  "Implicit attention (GDN) and softmax maps (attention) of test example 0, a row per run"
                  + (f" (the first {MAX_COMPARED})" if len(analyses) > MAX_COMPARED else "") + ".", "",
                  "![maps compared](attention.png)", ""]
        if first.recall:
            figures.recall_maps([(a.label, a.trace.layers, a.recall) for a in compared], out / "recall.png",
                                "what each query reads from the pairs (crosses: its key, circles: its value)")
            lines += ["## What each query reads from the pairs", "",
                      "A row per query of the analysed examples, a column per position among the pairs; A[t, s] "
                      "scaled by the row's largest |A|; crosses: the query's key, circles: its value.", "",
                      "![recall compared](recall.png)", ""]
        if first.distance and len(np.unique(first.distance["distance"])) > 1:
            figures.accuracy_by_distance({a.label: a.distance for a in analyses}, "key" in first.sources,
                                         out / "accuracy_by_distance.png", describe_task(first.run.config["task"]))
            lines += ["## Accuracy by distance", "", "![accuracy by distance](accuracy_by_distance.png)", ""]
        if first.loss is not None:
            figures.loss_by_position({a.label: a.loss for a in analyses}, out / "loss_by_position.png", "test loss")
            lines += ["## Loss by position", "", "![loss by position](loss_by_position.png)", ""]
    gated = [(a.label, [layer for layer in a.trace.layers if layer.kind == "gdn"]) for a in analyses]
    gated = [(label, layers) for label, layers in gated if layers]
    if gated:
        figures.gates_comparison(gated, out / "gates.png", "gates of each run (density over the examples' tokens)")
        lines += ["## Gates", "", "![gates compared](gates.png)", ""]
    return "\n".join(lines)


def page_names(run_dirs: list, paths: list) -> dict:
    """{run dir: its page's directory under --out}: "." for a lone run dir, else the run's path under the one PATH
    (a sweep's job dir name), or with several PATHs the run dir's name (numbered where names repeat)."""
    if len(run_dirs) == 1 and run_dirs[0] == paths[0]:
        return {run_dirs[0]: "."}
    names = {}
    for run_dir in run_dirs:
        name = frames.run_name(run_dir, paths[0]) if len(paths) == 1 else run_dir.name
        names[run_dir] = name if name not in names.values() else f"{name}-{len(names)}"
    return names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="run directories, or sweep directories (every run under them)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: PATH/analysis)")
    parser.add_argument("--examples", type=int, default=4, help="test examples to draw maps for")
    parser.add_argument("--eval-examples", type=int, default=1000,
                        help="test examples for accuracy by distance (and loss by position, up to 256)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (the maps are float64 there)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: half the available cores, as trainer.num_threads=null)")
    args = parser.parse_args(argv)
    for module in ("matplotlib", "pandas"):
        if not have(module):
            sys.exit(f"error: {missing(module, 'gdn-exp-analyze')}")
    torch.set_num_threads(args.threads or auto_threads())
    if args.out is None and len(args.paths) > 1:
        sys.exit("gdn-exp-analyze: several PATHs need --out DIR")
    out = args.out or args.paths[0] / "analysis"
    try:
        run_dirs = report.find_run_dirs([str(p) for p in args.paths])
    except ValueError as e:
        sys.exit(f"gdn-exp-analyze: {e}")
    if not run_dirs:
        sys.exit(f"gdn-exp-analyze: no run directory (with results.json) under {', '.join(map(str, args.paths))}")
    names = page_names(run_dirs, args.paths)
    single = list(names.values()) == ["."]
    labels = run_labels(run_dirs)
    analyses, skipped = [], []
    for run_dir in run_dirs:
        try:
            run = load_run(run_dir, args.device)
        except (ValueError, KernelUnavailableError) as e:
            if single:
                sys.exit(f"gdn-exp-analyze: {e}")
            skipped.append((run_dir, str(e)))
            continue
        label = run.label if single else labels[run_dir]
        print(f"analysing {run_dir} ({label})", flush=True)
        analyses.append(analyze_run(run, names[run_dir], label, out / names[run_dir], num_examples=args.examples,
                                    eval_examples=args.eval_examples))
    if not single:
        if not analyses:
            sys.exit(f"gdn-exp-analyze: no run under {', '.join(map(str, args.paths))} has a checkpoint")
        (out / "index.md").write_text(compare(analyses, ", ".join(map(str, args.paths)), out, skipped))
    print(f"-> {out / 'index.md'}")


if __name__ == "__main__":
    main()
