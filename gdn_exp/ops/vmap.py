"""vmap rules of the Triton autograd Functions, for packs of models (`gdn_exp.pack`: the model under
torch.func.vmap over a leading model axis M).

A Triton kernel cannot be traced by vmap, so each Function says what its batched form is (its `vmap`
staticmethod, which torch calls with the physical tensors and the model axis of each, `in_dims`):

    fold: the ops treat every sequence (row) of their batch independently, so M models' batches [M, B, ...] are
          one batch [M * B, ...]: one launch for the whole pack. Inputs without a model axis that are per-sequence
          data (a constant beta) are expanded to all models first. A Function whose kernels take a weight per
          model (the norms, the short conv) gets the models' weights stacked, [M, ...].
          The loss sums each model's rows on its own (its kernels take the number of models).
    loop: what cannot fold (packed sequences, a mean loss) runs once per model: M launches, each on its own
          slice.

Both call the Function's `apply` on plain tensors, so autograd records the launches as usual and the backward
pass needs no rule of its own.
"""
import torch


def fold_models(apply, info, in_dims, args, *, per_sequence, num_outputs, per_model=()):
    """The vmap rule that folds the model axis into the batch axis (axis 0) of the args at `per_sequence` (indices
    into args); the args at `per_model` (a weight the Function takes per model) get the model axis first,
    [M, ...]; the others must have no model axis. The first `num_outputs` outputs come back as [M, B, ...]
    (None stays None); any further ones (what backward keeps) have no model axis."""
    M = info.batch_size
    folded = list(args)
    for i in (*per_sequence, *per_model):
        x, dim = args[i], in_dims[i]
        if x is None:
            continue
        x = x.movedim(dim, 0) if dim is not None else x.expand(M, *x.shape)
        folded[i] = x.reshape(-1, *x.shape[2:]) if i in per_sequence else x
    outputs = apply(*folded)
    single = not isinstance(outputs, tuple)
    outputs = (outputs,) if single else outputs
    batched = [None if o is None else o.reshape(M, -1, *o.shape[1:]) for o in outputs[:num_outputs]]
    outputs = (*batched, *outputs[num_outputs:])
    out_dims = tuple(0 if o is not None and i < num_outputs else None for i, o in enumerate(outputs))
    return (outputs[0], out_dims[0]) if single else (outputs, out_dims)


def loop_models(apply, info, in_dims, args):
    """The vmap rule that applies the Function to each model's slice of the args in turn and stacks the outputs
    (None stays None). An arg's in_dim is an int where it has a model axis (else None, or a tuple of them for a
    tuple arg)."""
    # unbind, not select: its backward stacks the M slices' gradients in one kernel (select's would write each
    # into a zero tensor of the whole input, M times)
    per_model = [x.unbind(dim) if isinstance(dim, int) else [x] * info.batch_size for x, dim in zip(args, in_dims)]
    outputs = [apply(*model_args) for model_args in zip(*per_model)]
    if not isinstance(outputs[0], tuple):
        return torch.stack(outputs), 0
    stacked = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*outputs))
    return stacked, tuple(None if o is None else 0 for o in stacked)
