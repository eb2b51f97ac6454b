"""A pack's training step (`gdn_exp.pack.ModelPack`): each model's batch, forward, loss, backward, gradient
clipping and AdamW, all models at once and each with its own settings, with nothing read back to the host.

The pieces mirror the solo step (`train.step.TrainStep`) model by model: the same batch indices, the loss
normalised by the model's own scored tokens, `clip_grad_norm_` over the model's own gradients, and
torch.optim.AdamW's update with the model's own learning rate, betas, eps and weight decay (`StackedAdamW`).
A model whose gradient norm is not finite is frozen from that step on (`PackStep.active`): its weights stay
those before the step, and nothing of it reaches the others, whose computations never mix with it.
"""
import torch

from gdn_exp.train.step import TrainStep
from tasks import IGNORE_INDEX


def per_model(values, like: torch.Tensor) -> torch.Tensor:
    """A per-model vector [M] shaped to broadcast against a stacked tensor `like` [M, ...]."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class StackedAdamW:
    """torch.optim.AdamW (decoupled weight decay, bias-corrected moments) over parameters stacked on a leading
    model axis [M, ...], every model with its own hyperparameters; equal, model by model, to torch.optim.AdamW
    (tests/test_pack.py checks it).

    Per model m and stacked parameter p (weight decay only on `decay_names`, the model's matrices):

        p[m] <- p[m] (1 - lr[m] wd[m]);   m1 <- lerp(m1, g, 1 - beta1[m]);   m2 <- beta2[m] m2 + (1 - beta2[m]) g^2
        p[m] <- p[m] - lr[m] / (1 - beta1[m]^t) * m1 / (sqrt(m2) / sqrt(1 - beta2[m]^t) + eps[m])

    where t counts model m's own updates. `step(lr, active)` updates only the models where `active` [M] is True;
    the others keep their weights, moments and t (even where their gradients are NaN).

    Args:
        params: {name: stacked Parameter [M, ...]}.
        decay_names: the names that get weight decay.
        betas: [M, 2]; eps, weight_decay: [M] (sequences of floats).
    """

    def __init__(self, params: dict, decay_names, *, betas, eps, weight_decay):
        first = next(iter(params.values()))
        vector = lambda values: torch.tensor(values, dtype=first.dtype, device=first.device)   # noqa: E731
        self.params, self.decay_names = params, set(decay_names)
        betas = vector([list(b) for b in betas])
        self.beta1, self.beta2 = betas[:, 0], betas[:, 1]
        self.eps, self.weight_decay = vector(eps), vector(weight_decay)
        self.no_decay = torch.zeros_like(self.weight_decay)
        self.steps = torch.zeros(len(self.eps), dtype=first.dtype, device=first.device)   # t of each model
        self.state = {name: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for name, p in params.items()}

    @torch.no_grad()
    def step(self, lr: torch.Tensor, active: torch.Tensor) -> None:
        """One update of the active models. lr: [M] (param dtype); active: BoolTensor [M]."""
        steps = self.steps + active.to(self.steps.dtype)
        bias_correction1 = 1 - self.beta1 ** steps
        bias_correction2_sqrt = (1 - self.beta2 ** steps).sqrt()
        for name, p in self.params.items():
            state, grad = self.state[name], p.grad
            shaped = lambda values: per_model(values, p)   # noqa: E731
            wd = self.weight_decay if name in self.decay_names else self.no_decay
            exp_avg = state["exp_avg"].lerp(grad, shaped(1 - self.beta1))
            exp_avg_sq = state["exp_avg_sq"] * shaped(self.beta2) + shaped(1 - self.beta2) * grad * grad
            denom = (exp_avg_sq.sqrt() / shaped(bias_correction2_sqrt)) + shaped(self.eps)
            new = p * shaped(1 - lr * wd) - shaped(lr / bias_correction1) * exp_avg / denom
            keep = shaped(active)
            p.copy_(torch.where(keep, new, p))
            state["exp_avg"].copy_(torch.where(keep, exp_avg, state["exp_avg"]))
            state["exp_avg_sq"].copy_(torch.where(keep, exp_avg_sq, state["exp_avg_sq"]))
        self.steps.copy_(steps)

    @torch.no_grad()
    def export(self, index: int, model, optimizer) -> None:
        """Puts model `index`'s moments and step count into `optimizer`, a torch.optim.AdamW over the parameters of
        `model` (a solo LanguageModel), so that its state_dict is the one a solo run would save."""
        for name, param in model.named_parameters():
            optimizer.state[param] = {
                "step": torch.tensor(float(self.steps[index]), dtype=torch.float32, device=param.device),
                **{key: self.state[name][key][index].clone() for key in ("exp_avg", "exp_avg_sq")}}

    @torch.no_grad()
    def load(self, index: int, model, optimizer) -> None:
        """The inverse of `export`: model `index`'s moments and step count from a solo run's optimizer."""
        for name, param in model.named_parameters():
            state = optimizer.state.get(param)
            if state:  # a parameter never updated has no state yet
                self.steps[index] = state["step"].to(self.steps.dtype)
                for key in ("exp_avg", "exp_avg_sq"):
                    self.state[name][key][index].copy_(state[key])

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


@torch.no_grad()
def clip_grad_norms(params: dict, max_norms: torch.Tensor) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` of each model's own gradients: every stacked gradient [M, ...] of model m
    is scaled by min(1, max_norms[m] / (norm_m + 1e-6)), norm_m the L2 norm over all of model m's gradients.
    Returns the norms before clipping, [M]."""
    grads = [p.grad for p in params.values()]
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1)   # [M, n]
    total = torch.linalg.vector_norm(norms, dim=1)                                              # [M]
    coef = (max_norms / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(per_model(coef, g))
    return total


class PackSplit:
    """The training splits of a pack's models on the device, stacked: model m reads split `split_of[m]` (models
    of one seed share theirs). input_ids [S, N, T]; labels and positions [S, N, P] (positions None where every
    position is scored in every split; a split with fewer scored positions is padded with unscored ones)."""

    def __init__(self, splits: list):
        unique = list({id(s): s for s in splits}.values())
        index = {id(s): i for i, s in enumerate(unique)}
        device = unique[0].input_ids.device
        self.split_of = torch.tensor([index[id(s)] for s in splits], device=device)
        self.input_ids = torch.stack([s.input_ids for s in unique])
        if all(s.positions is None for s in unique):
            self.positions, self.labels = None, torch.stack([s.labels for s in unique])
            return
        num_positions = max(s.labels.shape[1] for s in unique)
        positions, labels = [], []
        for s in unique:
            n, T = s.input_ids.shape
            p = s.positions if s.positions is not None else torch.arange(T, device=device).expand(n, T)
            pad = num_positions - p.shape[1]
            positions.append(torch.nn.functional.pad(p, (0, pad)))
            labels.append(torch.nn.functional.pad(s.labels, (0, pad), value=IGNORE_INDEX))
        self.positions, self.labels = torch.stack(positions), torch.stack(labels)

    def batch(self, indices):
        """(input_ids [M, b, T], positions [M, b, P] or None, labels [M, b, P]) of each model's examples
        `indices` [M, b]."""
        split = self.split_of[:, None]
        positions = None if self.positions is None else self.positions[split, indices]
        return self.input_ids[split, indices], positions, self.labels[split, indices]


class PackStep:
    """`pack_step(indices, lr)` trains each active model of `pack` on its examples `indices` [M, batch_size] with
    learning rates `lr` [M]; `read()` returns every model's (loss, gradient norm) of the steps since the last read.
    `active` (BoolTensor [M] on the device) says which models train: the trainer clears a model's entry when it is
    done, and a step clears it where the gradient norm is not finite.

    Args:
        pack: the ModelPack; optimizer: its StackedAdamW; data: a PackSplit.
        grad_clip: [M] floats; autocast: a context factory for the forward pass.
        cuda_graph: capture the step after a few eager ones and replay it from then on (as `TrainStep`).
        window: the most steps between two reads.
    """

    def __init__(self, pack, optimizer, data, *, batch_size: int, grad_accum_steps: int, grad_clip, autocast,
                 cuda_graph: bool, window: int):
        device = data.input_ids.device
        M = pack.num_models
        self.pack, self.optimizer, self.data = pack, optimizer, data
        self.grad_accum_steps, self.autocast = grad_accum_steps, autocast
        self.max_norms = torch.tensor(grad_clip, dtype=optimizer.eps.dtype, device=device)
        self.cuda_graph, self.graph, self.eager_steps = cuda_graph, None, 0
        self.indices = torch.zeros(M, batch_size, dtype=torch.long, device=device)   # the step's inputs
        self.lr = torch.zeros(M, dtype=optimizer.eps.dtype, device=device)
        self.active = torch.ones(M, dtype=torch.bool, device=device)
        self.record = torch.zeros(M, 2, device=device)               # its output: loss, gradient norm per model
        self.history = torch.zeros(window, M, 2, device=device)      # the records since the last read
        self.rows = 0

    def compute(self) -> None:
        """One step on self.indices: writes each model's (token-mean loss, gradient norm) into self.record."""
        scored = (self.data.batch(self.indices)[2] != IGNORE_INDEX).sum(-1).sum(-1).clamp(min=1)   # [M]
        loss_sum = torch.zeros(self.pack.num_models, device=self.indices.device)
        for micro in self.indices.chunk(self.grad_accum_steps, dim=1):
            input_ids, positions, labels = self.data.batch(micro)
            with self.autocast():
                loss = self.pack.loss_sums(input_ids, positions, labels)          # [M]
            (loss / scored).sum().backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norms(self.pack.params, self.max_norms)
        self.active &= torch.isfinite(grad_norm)
        self.optimizer.step(self.lr, self.active)
        self.record.copy_(torch.stack([loss_sum / scored, grad_norm.float()], dim=1))  # as the solo step

    def eager(self) -> None:
        self.compute()
        self.optimizer.zero_grad()

    def __call__(self, indices: torch.Tensor, lr: torch.Tensor) -> None:
        self.indices.copy_(indices)
        self.lr.copy_(lr, non_blocking=True)  # from the host: staged at once, without waiting for the device
        if self.graph is not None:
            self.graph.replay()
        elif not self.cuda_graph:
            self.eager()
        else:
            self.warm_up_or_capture()
        self.history[self.rows].copy_(self.record)
        self.rows += 1

    warm_up_or_capture = TrainStep.warm_up_or_capture  # the same warm-up and capture as a solo step

    def read(self) -> torch.Tensor:
        """Host FloatTensor [n, M, 2]: each model's (token-mean loss, gradient norm) in each of the n steps since
        the last read, oldest first. Waits for them."""
        rows = self.history[: self.rows].cpu()
        self.rows = 0
        return rows
