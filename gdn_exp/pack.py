"""A pack: M language models of one shape as one module, so that one set of kernels trains them all.

Each parameter of the M models is stacked on a leading model axis ([M, ...] for a model's [...]), and the forward
is the one model definition, `LanguageModel`, under `torch.func.vmap` over (parameters, inputs [M, B, T]):

    logits = vmap(functional_call(LanguageModel, params_m, input_ids_m))(stacked params, input_ids)

Under vmap every op becomes its batched form: a Linear a batched matmul, the embedding one gather, the norms and
the token mixers one launch over the M * B sequences (the Triton ops' vmap rules fold the model axis into the
batch axis, `ops.vmap`). Nothing mixes models: model m's outputs and gradients are those of model m alone, so a
pack reproduces M solo runs (tests/test_pack.py) and a NaN in one model stays in it.
"""
import copy
import warnings

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from gdn_exp.model import LanguageModel
from gdn_exp.train.evaluate import lm_loss


# a gradient that is a view into flat_grad has the parameter's strides, not a contiguous layout: torch notes it
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


class ModelPack(nn.Module):
    """M LanguageModels with equal parameter shapes as one module of stacked parameters [M, ...].

    `params` maps each of the model's parameter names (`named_parameters()`: tied weights once) to its stacked
    Parameter, which the pack registers as its own (`_attr`). The models' configs may differ in anything that
    keeps every shape (init_std, name); their decay groups (`LanguageModel.param_groups`) are the same.

    Every stacked parameter is a view into one buffer `flat` [M, P] (P: one model's parameter count; row m is
    model m's parameters, one after another, the `num_decay` columns of those with weight decay first), and its
    gradient a view into `flat_grad` [M, P], into which backward accumulates in place: the optimizer and the
    clipping then work on contiguous rows whatever the number of parameters (`train.pack_step`).
    Build the models on their device first: `.to()` would give the pack parameters of its own, outside `flat`.
    """

    def __init__(self, models: list):
        super().__init__()
        first = models[0]
        shapes = [{n: p.shape for n, p in m.named_parameters()} for m in models]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("a pack needs models whose parameters have the same names and shapes")
        if list(first.buffers()):
            raise ValueError("a pack stacks parameters only; the model has buffers")
        stacked, _ = stack_module_state(models)                              # {name: [M, ...]}
        self.num_models = M = len(models)
        decay_ids = {id(p) for p in first.param_groups(0.0)[0]["params"]}
        decays = [n for n, p in first.named_parameters() if id(p) in decay_ids]
        stacked = {name: stacked[name] for name in decays + [n for n in stacked if n not in decays]}
        self.names = list(stacked)
        self.num_decay = sum(stacked[name][0].numel() for name in decays)  # the first columns: weight decay
        self.flat = torch.cat([t.detach().reshape(M, -1) for t in stacked.values()], dim=1)         # [M, P]
        self.flat_grad = torch.zeros_like(self.flat)
        self.layout, offset = {}, 0  # {name: (first column in flat, stacked shape)}
        for name, tensor in stacked.items():
            self.layout[name] = (offset, tensor.shape)
            offset += tensor[0].numel()
            param = nn.Parameter(self.view(self.flat, name))
            param.grad = self.view(self.flat_grad, name)
            self.register_parameter(_attr(name), param)
        # the computation, without weights of its own: functional_call swaps in one model's slices
        self._template = (copy.deepcopy(first).to("meta"),)  # a tuple: not a submodule, no parameters here

    def view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """Parameter `name`'s part of a tensor laid out as `flat` [M, P] (the weights, their gradients, an
        optimizer state), as [M, *its shape]."""
        offset, shape = self.layout[name]
        return flat[:, offset : offset + shape[1:].numel()].view(shape)

    @property
    def params(self) -> dict:
        """{model parameter name: stacked Parameter [M, ...]}."""
        return {name: getattr(self, _attr(name)) for name in self.names}

    def _logits(self, params, input_ids, positions):
        """One model's forward (under vmap: each model's)."""
        return functional_call(self._template[0], params, (input_ids,), {"positions": positions})

    def _loss_sum(self, params, input_ids, positions, labels):
        return lm_loss(self._logits(params, input_ids, positions), labels, reduction="sum")

    def forward(self, input_ids, positions=None):
        """input_ids [M, B, T], positions [M, B, P] or None -> logits [M, B, P (or T), vocab]."""
        in_dims = (0, 0, None if positions is None else 0)
        return vmap(self._logits, in_dims=in_dims)(self.params, input_ids, positions)

    def loss_sums(self, input_ids, positions, labels):
        """Each model's summed token loss over its batch: FloatTensor [M]. input_ids [M, B, T]; positions
        [M, B, P] or None; labels [M, B, P] (IGNORE_INDEX: not scored)."""
        return vmap(self._loss_sum, in_dims=(0, 0, None if positions is None else 0, 0))(
            self.params, input_ids, positions, labels)

    @torch.no_grad()
    def copy_to(self, index: int, model: LanguageModel) -> LanguageModel:
        """Writes model `index`'s weights into `model` (a LanguageModel of the pack's shape); returns it."""
        for name, param in model.named_parameters():
            param.copy_(self.params[name][index])
        return model

    @torch.no_grad()
    def copy_from(self, index: int, model: LanguageModel) -> None:
        """Sets model `index`'s weights to `model`'s."""
        for name, param in model.named_parameters():
            self.params[name][index].copy_(param)


def _attr(name: str) -> str:
    """A parameter's attribute name in the pack ("blocks.0.mixer.qkv_proj.weight" -> "blocks_0_mixer_..."):
    a registered name may not contain dots."""
    return name.replace(".", "_")
