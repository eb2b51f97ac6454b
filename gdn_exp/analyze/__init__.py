"""Look inside a trained model: implicit attention, state and gates of each layer, from one command or a notebook.

    from gdn_exp import analyze
    run = analyze.load_run("outputs/runs/<run dir>")   # model (eval mode), resolved config, test split
    trace = run.trace(run.examples(4))                  # every layer's op inputs on test examples 0..3
    layer = trace.layers[0]
    layer.q, layer.k, layer.v, layer.g, layer.beta      # [B, T, H, K], [B, T, H, V], [B, T, H] (float64)
    A = layer.attention()                               # [B, H, T, T]: implicit attention (softmax for attention)
    S = layer.states()                                  # [B, T, H, K, V]: the state after every token
    analyze.metrics(run.path)                           # metrics.jsonl as a DataFrame (pandas)
    analyze.results("outputs/multiruns/<sweep>")        # one row per run

The command, `gdn-exp-analyze RUN_OR_SWEEP_DIR... [--out DIR]`, draws all of it (`gdn_exp.analyze.cli`).
Modules: `maps` (the float64 maps and state statistics), `runs` (loading and tracing), `views` (task-aware
views), `frames` (DataFrames), `figures` (PNGs), `cli`.
"""
from .frames import metrics, results
from .maps import apply_attention, gdn_states, implicit_attention, softmax_attention, state_statistics
from .runs import Layer, Run, Trace, load_run
from .views import accuracy_by_distance, answer_sources, loss_by_position

__all__ = ["Layer", "Run", "Trace", "accuracy_by_distance", "answer_sources", "apply_attention", "gdn_states",
           "implicit_attention", "load_run", "loss_by_position", "metrics", "results", "softmax_attention",
           "state_statistics"]
