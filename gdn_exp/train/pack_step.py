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


class StackedAdamW:
    """torch.optim.AdamW over a ModelPack's parameters, every model with its own learning rate, betas, eps and
    weight decay: per model, torch's own fused AdamW kernel (`torch._fused_adamw_`, what
    torch.optim.AdamW(fused=True) runs, so the update is the solo run's to the bit) on row m of the pack's `flat`
    [M, P] and `flat_grad`, twice: on the columns with weight decay (the matrices) and on those without.

    `step(lr, active)` updates only the models where `active` [M] is True (the kernel's found_inf for the others):
    they keep their weights, moments and step count t, even where their gradients are NaN.

    Args:
        pack: the ModelPack.
        betas: [M] pairs; eps, weight_decay: [M] floats.
    """

    def __init__(self, pack, *, betas, eps, weight_decay):
        self.pack, self.betas, self.eps, self.weight_decay = pack, [tuple(b) for b in betas], list(eps), \
            list(weight_decay)
        self.steps = torch.zeros(pack.num_models, dtype=torch.float32, device=pack.flat.device)   # t per model
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(pack.flat), torch.zeros_like(pack.flat)

    @torch.no_grad()
    def step(self, lr: torch.Tensor, active: torch.Tensor) -> None:
        """One update of the active models. lr: [M] (the parameters' dtype); active: BoolTensor [M]."""
        self.steps += active
        skip = (~active).float()
        tensors = (self.pack.flat, self.pack.flat_grad, self.exp_avg, self.exp_avg_sq)
        decay = self.pack.num_decay
        for m, ((beta1, beta2), eps, weight_decay) in enumerate(zip(self.betas, self.eps, self.weight_decay)):
            for columns, wd in ((slice(None, decay), weight_decay), (slice(decay, None), 0.0)):
                p, grad, exp_avg, exp_avg_sq = ([t[m, columns]] for t in tensors)
                torch._fused_adamw_(p, grad, exp_avg, exp_avg_sq, [], [self.steps[m]], lr=lr[m], beta1=beta1,
                                    beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                                    grad_scale=None, found_inf=skip[m])

    @torch.no_grad()
    def export(self, index: int, model, optimizer) -> None:
        """Puts model `index`'s moments and step count into `optimizer`, a torch.optim.AdamW over the parameters of
        `model` (a solo LanguageModel), so that its state_dict is the one a solo run would save."""
        for name, param in model.named_parameters():
            optimizer.state[param] = {
                "step": self.steps[index].clone(),
                "exp_avg": self.pack.view(self.exp_avg, name)[index].clone(),
                "exp_avg_sq": self.pack.view(self.exp_avg_sq, name)[index].clone()}

    @torch.no_grad()
    def load(self, index: int, model, optimizer) -> None:
        """The inverse of `export`: model `index`'s moments and step count from a solo run's optimizer."""
        for name, param in model.named_parameters():
            state = optimizer.state.get(param)
            if state:  # a parameter never updated has no state yet
                self.steps[index] = state["step"]
                self.pack.view(self.exp_avg, name)[index].copy_(state["exp_avg"])
                self.pack.view(self.exp_avg_sq, name)[index].copy_(state["exp_avg_sq"])

    def zero_grad(self) -> None:
        self.pack.flat_grad.zero_()  # backward accumulates into it


@torch.no_grad()
def clip_grad_norms(flat_grad: torch.Tensor, max_norms: torch.Tensor) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` of each model's own gradients: row m of `flat_grad` [M, P] (model m's
    gradients) is scaled by min(1, max_norms[m] / (norm_m + 1e-6)), norm_m its L2 norm. Returns the norms before
    clipping, [M]."""
    norms = torch.linalg.vector_norm(flat_grad, dim=1)
    flat_grad.mul_((max_norms / (norms + 1e-6)).clamp(max=1.0)[:, None])
    return norms


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
        self.max_norms = torch.tensor(grad_clip, dtype=pack.flat.dtype, device=device)
        self.cuda_graph, self.graph, self.eager_steps = cuda_graph, None, 0
        self.indices = torch.zeros(M, batch_size, dtype=torch.long, device=device)   # the step's inputs
        self.lr = torch.zeros(M, dtype=pack.flat.dtype, device=device)
        self.active = torch.ones(M, dtype=torch.bool, device=device)
        self.record = torch.zeros(M, 2, device=device)               # its output: loss, gradient norm per model
        self.history = torch.zeros(window, M, 2, device=device)      # the records since the last read
        self.rows = 0

    def compute(self) -> None:
        """One step on self.indices: writes each model's (token-mean loss, gradient norm) into self.record."""
        self.optimizer.zero_grad()
        scored = (self.data.batch(self.indices)[2] != IGNORE_INDEX).sum(-1).sum(-1).clamp(min=1)   # [M]
        loss_sum = torch.zeros(self.pack.num_models, device=self.indices.device)
        for micro in self.indices.chunk(self.grad_accum_steps, dim=1):
            input_ids, positions, labels = self.data.batch(micro)
            with self.autocast():
                loss = self.pack.loss_sums(input_ids, positions, labels)          # [M]
            (loss / scored).sum().backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norms(self.pack.flat_grad, self.max_norms)
        self.active &= torch.isfinite(grad_norm)
        self.optimizer.step(self.lr, self.active)
        self.record.copy_(torch.stack([loss_sum / scored, grad_norm.float()], dim=1))  # as the solo step

    eager = compute  # the gradients are zeroed at the start of each step (also in a captured one)

    def __call__(self, indices: torch.Tensor, lr: torch.Tensor) -> None:
        self.indices.copy_(indices)
        self.lr.copy_(lr, non_blocking=True)  # from the host: staged at once, without waiting for the device
        self.run()

    # as a solo step: replay, or eager steps, a warm-up and the capture
    run, warm_up_or_capture = TrainStep.run, TrainStep.warm_up_or_capture

    def read(self) -> torch.Tensor:
        """Host FloatTensor [n, M, 2]: each model's (token-mean loss, gradient norm) in each of the n steps since
        the last read, oldest first. Waits for them."""
        rows = self.history[: self.rows].cpu()
        self.rows = 0
        return rows
