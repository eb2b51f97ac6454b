"""The PNGs of `gdn-exp-analyze`: each function takes plain tensors and arrays and writes one figure (matplotlib
is imported when one is drawn).

Maps are drawn with t (the output token) down and s (the token whose value is read) across. GDN maps use a diverging
scale around 0 (the delta rule gives negative weights), clipped at the 99.5th percentile of |A| so that one large
diagonal entry does not wash out the rest; softmax maps run from 0 to their largest weight.
"""
import textwrap

import numpy as np
import torch

PANEL = 2.6  # inches per map panel


def log_y(ax) -> None:
    """A log y axis whose minor tick labels (matplotlib's only labels on a short range) are as small as the rest."""
    ax.set_yscale("log")
    ax.tick_params(axis="y", which="both", labelsize=6)


def subplots(rows: int, cols: int, figsize: tuple, **kwargs):
    """(figure, axes [rows, cols]) drawn by the Agg backend, without pyplot: pyplot's backend stays as it was (a
    notebook that calls these keeps its inline plots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kwargs)


def save(fig, path, title: str) -> None:
    """Writes fig with `title` on top, wrapped to the figure's width."""
    fig.suptitle(textwrap.fill(title, int(14 * fig.get_figwidth())), fontsize=9)
    fig.savefig(path, dpi=90)


def draw_map(ax, A: torch.Tensor, kind: str, markers: dict) -> None:
    """One map A [T, T] on ax, with markers {"source": [T], "key": [T]} (−1: none) at (s = marker, t)."""
    A = A.numpy()
    if kind == "gdn":
        lower = np.abs(A[np.tril_indices_from(A)])
        limit = max(np.percentile(lower, 99.5), 1e-12)
        image = ax.imshow(A, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    else:
        image = ax.imshow(A, cmap="Purples", vmin=0, vmax=A.max(), interpolation="nearest")
    for name, style in (("key", dict(marker="x", color="tab:green")), ("source", dict(marker="o", color="black"))):
        if name in markers:
            t = np.nonzero(markers[name].numpy() >= 0)[0]
            ax.scatter(markers[name].numpy()[t], t, s=14, facecolors="none" if name == "source" else None,
                       linewidths=0.8, **style)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    ax.tick_params(labelsize=6)


def layer_title(layer) -> str:
    what = "attention" if layer.kind == "attention" else ("GDN" if layer.use_delta else "GDN, no delta")
    return f"layer {layer.index} ({what})"


def attention_maps(layers: list, maps: list, markers: dict, path, title: str) -> None:
    """One example's maps: a row per layer, a column per head. maps: [H, T, T] per layer; markers as in `draw_map`."""
    cols = max(layer.num_heads for layer in layers)
    fig, axes = subplots(len(layers), cols, figsize=(PANEL * cols, PANEL * len(layers) + 0.3))
    for row, (layer, A) in zip(axes, zip(layers, maps)):
        for h, ax in enumerate(row):
            if h >= layer.num_heads:
                ax.axis("off")
                continue
            draw_map(ax, A[h], layer.kind, markers)
            ax.set_title(f"{layer_title(layer)}, head {h}", fontsize=7)
        row[0].set_ylabel("t (output token)", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("s (token read)", fontsize=7)
    save(fig, path, title)


def attention_comparison(rows: list, markers: dict, path, title: str) -> None:
    """The same example under several runs: rows [(run label, layers, maps)], one row of layer x head panels each."""
    cols = max(sum(layer.num_heads for layer in layers) for _, layers, _ in rows)
    fig, axes = subplots(len(rows), cols, figsize=(PANEL * cols, PANEL * len(rows) + 0.3))
    for axes_row, (label, layers, maps) in zip(axes, rows):
        panels = [(layer, A[h], h) for layer, A in zip(layers, maps) for h in range(layer.num_heads)]
        for ax in axes_row[len(panels):]:
            ax.axis("off")
        for ax, (layer, A, h) in zip(axes_row, panels):
            draw_map(ax, A, layer.kind, markers)
            ax.set_title(f"{layer_title(layer)}, head {h}", fontsize=7)
        axes_row[0].set_ylabel(f"{label}\nt", fontsize=7)
    save(fig, path, title)


def recall_maps(rows: list, path, title: str) -> None:
    """What each query reads from the key-value pairs: rows [(run label, layers, recall rows)], one row of layer x
    head panels per run, with recall rows ([Q, H, context], key [Q], value [Q]) per layer from `views.recall_rows`.
    Each panel: a row per query, a column per context position, A scaled to the row's largest |A|; crosses mark
    the query's key, circles its value."""
    cols = max(sum(layer.num_heads for layer in layers) for _, layers, _ in rows)
    queries, context = rows[0][2][0][0].shape[0], rows[0][2][0][0].shape[-1]
    cell = min(0.17, 6 / max(queries, context))  # inches: a needle haystack gets thin columns
    fig, axes = subplots(len(rows), cols, figsize=(max(cell * context, 1.6) * cols + 0.6,
                                                   (cell * queries + 0.8) * len(rows) + 0.3))
    for axes_row, (label, layers, recall) in zip(axes, rows):
        panels = [(layer, h, *layer_rows) for layer, layer_rows in zip(layers, recall) for h in range(layer.num_heads)]
        for ax in axes_row[len(panels):]:
            ax.axis("off")
        for ax, (layer, h, A, key, value) in zip(axes_row, panels):
            q = np.arange(len(key))
            ax.imshow(A[:, h].numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
            ax.scatter(key.numpy(), q, s=8, marker="x", color="tab:green", linewidths=0.6)
            ax.scatter(value.numpy(), q, s=8, facecolors="none", edgecolors="black", linewidths=0.6)
            ax.set_title(f"{layer_title(layer)}, head {h}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("position among the pairs", fontsize=7)
        axes_row[0].set_ylabel(f"{label}\nquery", fontsize=7)
    save(fig, path, title)


def state_over_time(layers: list, statistics: list, answer_start: int, path, title: str) -> None:
    """`maps.state_statistics` of each GDN layer: a row per statistic, a column per layer, a line per head (mean over
    the examples); the dotted line marks the first scored position."""
    names = {"norm": "‖S_t‖_F", "effective_rank": "effective rank", "update": "update ‖S_t − αS‖/‖αS‖",
             "erased": "erased ‖βkkᵀαS‖/‖αS‖"}
    fig, axes = subplots(len(names), len(layers), figsize=(3.6 * len(layers), 2.0 * len(names)), sharex=True)
    for col, (layer, stats) in enumerate(zip(layers, statistics)):
        for row, name in enumerate(names):
            ax = axes[row][col]
            mean = torch.nanmean(stats[name], dim=0).numpy()                   # [T, H]
            for h in range(mean.shape[1]):
                ax.plot(mean[:, h], linewidth=1, label=f"head {h}")
            if answer_start >= 0:
                ax.axvline(answer_start, color="grey", linestyle=":", linewidth=1)
            if name == "update":
                log_y(ax)
            ax.set_ylabel(names[name], fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(layer_title(layer), fontsize=8)
        axes[-1][col].set_xlabel("t", fontsize=7)
    axes[0][0].legend(fontsize=6)
    save(fig, path, title)


def gates(layers: list, path, title: str) -> None:
    """Distributions over the examples' tokens of α = exp(g), β and the memory length 1 / (1 − α): a row per GDN
    layer, a colour per head."""
    fig, axes = subplots(len(layers), 3, figsize=(10, 2.2 * len(layers)))
    for row, layer in zip(axes, layers):
        alpha, beta = layer.alpha.flatten(0, 1).numpy(), layer.beta.flatten(0, 1).numpy()     # [B T, H]
        memory = layer.memory_length.flatten(0, 1).numpy()
        finite = np.isfinite(memory)
        for h in range(layer.num_heads):
            row[0].hist(alpha[:, h], bins=np.linspace(0, 1, 41), histtype="step", label=f"head {h}")
            row[1].hist(beta[:, h], bins=np.linspace(0, 2 if beta.max() > 1 else 1, 41), histtype="step")
            if finite[:, h].any():
                lengths = memory[finite[:, h], h]
                bins = np.geomspace(max(lengths.min(), 1), max(lengths.max(), 2), 41)
                row[2].hist(lengths, bins=bins, histtype="step")
        if not finite.any():
            row[2].text(0.5, 0.5, "no decay (α = 1)", ha="center", va="center", transform=row[2].transAxes)
        else:
            row[2].set_xscale("log")
        for ax, name in zip(row, ("α = exp(g)", "β", "memory length 1 / (1 − α), tokens")):
            ax.set_xlabel(name, fontsize=7)
            ax.tick_params(labelsize=6)
        row[0].set_ylabel(f"{layer_title(layer)}\ntokens", fontsize=7)
    axes[0][0].legend(fontsize=6)
    save(fig, path, title)


def gates_comparison(runs: list, path, title: str) -> None:
    """α (top) and β (bottom) of each run, overlaid as densities over the examples' tokens: runs [(label, GDN
    layers)]; a column per GDN layer and head."""
    panels = max(sum(layer.num_heads for layer in layers) for _, layers in runs)
    fig, axes = subplots(2, panels, figsize=(2.6 * panels, 4.2))
    for i, (label, layers) in enumerate(runs):
        heads = [(layer, h) for layer in layers for h in range(layer.num_heads)]
        for col, (layer, h) in enumerate(heads):
            axes[0][col].hist(layer.alpha[..., h].flatten().numpy(), bins=np.linspace(0, 1, 41), histtype="step",
                              density=True, color=f"C{i}", label=label)
            beta_bins = np.linspace(0, 2 if layer.beta.max() > 1 else 1, 41)  # neg_eigval: β in [0, 2]
            axes[1][col].hist(layer.beta[..., h].flatten().numpy(), bins=beta_bins, histtype="step", density=True,
                              color=f"C{i}")
            axes[0][col].set_title(f"layer {layer.index}, head {h}", fontsize=8)
    for top, bottom in zip(*axes):
        top.set_xlabel("α = exp(g)", fontsize=7)
        bottom.set_xlabel("β", fontsize=7)
        for ax in (top, bottom):
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    save(fig, path, title)


def alignment(layers: list, argmaxes: list, hit_rates: list, source: torch.Tensor, path, title: str) -> None:
    """Per layer (row) and head (column): for each scored position t of the examples, argmax_s A[t, s] (dots: green
    on the expected source, red elsewhere) against the expected source (black line of crosses)."""
    cols = max(layer.num_heads for layer in layers)
    fig, axes = subplots(len(layers), cols, figsize=(2.8 * cols, 2.5 * len(layers)))
    b, t = (source >= 0).nonzero(as_tuple=True)
    expected = source[b, t]
    for row, layer, argmax, hits in zip(axes, layers, argmaxes, hit_rates):
        for h, ax in enumerate(row):
            if h >= layer.num_heads:
                ax.axis("off")
                continue
            chosen = argmax[b, h, t]
            hit = (chosen == expected).numpy()
            ax.scatter(t[hit], chosen[hit], s=8, color="tab:green", alpha=0.6)
            ax.scatter(t[~hit], chosen[~hit], s=8, color="tab:red", alpha=0.6)
            ax.scatter(t, expected, s=10, marker="x", color="black", linewidths=0.6)
            ax.set_title(f"{layer_title(layer)}, head {h}\n{hits[h]:.0%} on the source", fontsize=7)
            ax.tick_params(labelsize=6)
        row[0].set_ylabel("argmax_s A[t, s]", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("t (scored position)", fontsize=7)
    save(fig, path, title)


def profiles(layers: list, profiles: list, width: int, recall: bool, path, title: str) -> None:
    """Mean share of |A[t, ·]| at offsets around each scored position's source (`views.profile_around`): a panel per
    layer, a line per head; for recall tasks offset 0 is the value and −1 the key."""
    fig, axes = subplots(1, len(layers), figsize=(3.4 * len(layers), 2.8), sharey=True)
    offsets = np.arange(-width, width + 1)
    for ax, layer, profile in zip(axes[0], layers, profiles):
        for h in range(layer.num_heads):
            ax.plot(offsets, profile[h].numpy(), marker=".", linewidth=1, label=f"head {h}")
        ax.axvline(0, color="black", linewidth=0.6)
        if recall:
            ax.axvline(-1, color="tab:green", linewidth=0.6, linestyle="--")
        ax.set_title(layer_title(layer), fontsize=8)
        ax.set_xlabel("s − value position (dashed: key)" if recall else "s − source position", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean |A[t, s]| / Σ_s |A[t, s]|", fontsize=7)
    axes[0][0].legend(fontsize=6)
    save(fig, path, title)


def binned_accuracy(distance: np.ndarray, correct: np.ndarray, bins: int = 12) -> tuple:
    """(bin centres, accuracy, count) over up to `bins` equal-width distance bins, empty bins dropped."""
    edges = np.linspace(distance.min(), distance.max() + 1, min(bins, distance.max() - distance.min() + 1) + 1)
    index = np.clip(np.digitize(distance, edges) - 1, 0, len(edges) - 2)
    count = np.bincount(index, minlength=len(edges) - 1)
    hits = np.bincount(index, weights=correct.astype(float), minlength=len(edges) - 1)
    keep = count > 0
    return ((edges[:-1] + edges[1:]) / 2 - 0.5)[keep], (hits / np.maximum(count, 1))[keep], count[keep]


def accuracy_by_distance(curves: dict, recall: bool, path, title: str) -> None:
    """Accuracy against the distance from the query to its key (recall) or from the output to its source: curves
    {label: {"distance", "correct"}}, a line per run, marker area ∝ the number of positions in the bin."""
    fig, axes = subplots(1, 1, figsize=(5.2, 3.2))
    ax = axes[0][0]
    for i, (label, curve) in enumerate(curves.items()):
        centres, accuracy, count = binned_accuracy(curve["distance"], curve["correct"])
        ax.plot(centres, accuracy, color=f"C{i}", linewidth=1, label=f"{label} ({curve['correct'].mean():.3f})")
        ax.scatter(centres, accuracy, s=8 + 60 * count / count.max(), color=f"C{i}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("t − key position (query to key)" if recall else "t − source position", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path, title)


def loss_by_position(curves: dict, path, title: str) -> None:
    """Mean test loss at each position, a line per run: curves {label: [T]}."""
    fig, axes = subplots(1, 1, figsize=(5.2, 3.2))
    ax = axes[0][0]
    for label, loss in curves.items():
        ax.plot(loss, linewidth=1, label=label)
    ax.set_xlabel("position in the row", fontsize=8)
    ax.set_ylabel("cross-entropy (nats)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path, title)


def training_curves(frame, path, title: str) -> None:
    """test/accuracy (or test/loss) and train/loss against the step, a line per value of frame["run"] (rows as
    `frames.metrics` gives them)."""
    metric = "test/accuracy" if "test/accuracy" in frame else "test/loss"
    fig, axes = subplots(1, 2, figsize=(9, 3.0))
    axes = axes[0]
    for run, rows in frame.groupby("run", sort=False):
        for ax, name in zip(axes, (metric, "train/loss")):
            points = rows[["step", name]].dropna() if name in rows else rows.iloc[:0]
            ax.plot(points["step"], points[name], linewidth=1, label=run)
    for ax, name in zip(axes, (metric, "train/loss")):
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    log_y(axes[1])
    axes[0].legend(fontsize=7)
    save(fig, path, title)
