"""LanguageModel: shapes, causality, cached decoding == full forward, generate (eager, static buffers, CUDA
graphs), param groups, configs, training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdn_exp.model import LanguageModel, ModelConfig, StaticDecoder

VOCAB = 32

FAMILIES = {
    "gdn": dict(),
    "attention": dict(mixer="attention"),
    "hybrid": dict(n_layers=4, attention_every=2),
    "sliding_window_hybrid": dict(n_layers=4, attention_every=2, attention_window=4),
    "gla": dict(use_delta=False, use_beta=False, decay="channel"),
    "zoology_attention": dict(mixer="attention", position_embedding="learned", max_positions=20, mlp=False,
                              norm="layernorm", attention_bias=True, tie_embeddings=True),
}


def tiny_model(dtype=torch.float64, **overrides) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, head_dim=16, attention_heads=2, **overrides)
    return LanguageModel(cfg).to(dtype)


def random_tokens(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_dtype():
    """Logits come in the lm_head's compute dtype: the model's, or bf16 under bf16 autocast."""
    model = tiny_model(torch.float32)
    logits = model(random_tokens(3, 11))
    assert logits.shape == (3, 11, VOCAB) and logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(random_tokens(3, 11)).dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_model_is_causal(family):
    model = tiny_model(**FAMILIES[family])
    tokens = random_tokens(2, 16)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    logits, logits_changed = model(tokens), model(changed)
    torch.testing.assert_close(logits[:, :10], logits_changed[:, :10], rtol=0, atol=0)
    assert (logits[:, 10:] - logits_changed[:, 10:]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_full_forward(family):
    model = tiny_model(**FAMILIES[family])
    tokens = random_tokens(2, 20)
    full = model(tokens)
    logits, cache = model(tokens[:, :6], use_cache=True)       # prefill
    pieces = [logits]
    logits, cache = model(tokens[:, 6:11], cache=cache, use_cache=True)   # a second multi-token piece
    pieces.append(logits)
    for t in range(11, 20):                                    # then one token at a time
        logits, cache = model(tokens[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sliding_window_hybrid", "zoology_attention"])
def test_packed_sequences_equal_separate_runs(family):
    model = tiny_model(**FAMILIES[family])  # learned positions restart at each sequence
    lengths = [7, 2, 11]
    tokens = random_tokens(1, sum(lengths))
    cu_seqlens = torch.tensor([0, 7, 9, 20])
    packed = model(tokens, cu_seqlens=cu_seqlens)
    separate = torch.cat([model(part) for part in tokens.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gdn", "hybrid"])
def test_greedy_generate_equals_argmax_of_full_forwards(family):
    model = tiny_model(**FAMILIES[family])
    prompt = random_tokens(2, 5)
    generated = model.generate(prompt, 8)
    expected = prompt
    for _ in range(8):
        next_token = model(expected)[:, -1].argmax(dim=-1, keepdim=True)
        expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)


def test_sampling_with_top_1_is_greedy():
    model = tiny_model()
    prompt = random_tokens(2, 5)
    sampled = model.generate(prompt, 6, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, model.generate(prompt, 6))


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("triton", marks=pytest.mark.interpreter),
])
def test_static_decoder_matches_eager_generate_and_updates_the_cache_in_place(backend):
    """The decode step on fixed buffers (what a CUDA graph replays), run eagerly: the same greedy tokens as the
    eager loop, with the same cache tensors advanced in place every step. backend="triton" reaches the in-place
    decode kernel (interpreted on CPU; mode="recurrent" keeps the interpreted prefill short)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, head_dim=16)
    model = LanguageModel(cfg, mode="recurrent", backend=backend)
    prompt = random_tokens(2, 5)
    expected = model.generate(prompt, 6, cuda_graph=False)
    with torch.no_grad():
        logits, cache = model(prompt, use_cache=True)
    decoder = StaticDecoder(model, cache)
    buffers = [(t, t.data_ptr(), t.clone()) for layer in decoder.cache for t in layer.values()]
    tokens, logits = [prompt], logits[:, -1]
    for _ in range(5):
        tokens.append(logits.argmax(dim=-1, keepdim=True))
        logits = decoder.step(tokens[-1])
    tokens.append(logits.argmax(dim=-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, dim=1), expected)
    now = [t for layer in decoder.cache for t in layer.values()]
    assert len(now) == len(buffers) == 2 * cfg.n_layers
    for (tensor, pointer, before), current in zip(buffers, now):
        assert current is tensor and current.data_ptr() == pointer and not torch.equal(current, before)


@pytest.mark.interpreter
@pytest.mark.parametrize("family", ["gdn", "attention"])
def test_fused_residual_adds_equal_the_torch_backend_under_autocast(family, monkeypatch):
    """The residual-stream norms on the Triton backend, each adding the residual in (the first block's mixer norm
    has nothing to add, the final norm's new residual is not used), give the PyTorch norms' loss and parameter
    gradients under autocast. The mixers and MLPs stay on the torch backend, so the norms are all that differs.
    float16 autocast, not the models' bf16: the interpreter truncates float32 to bf16 (the GPU and torch round to
    nearest), which moves the gradients by percents; float16 it rounds as torch does, and what is left is float32
    sums in another order now and then rounding to the neighbouring float16."""
    from gdn_exp.model import AutocastRMSNorm
    from gdn_exp.ops.gated_norm import kernel

    calls, add_rms_norm = [], kernel.triton_add_rms_norm

    def counted(*args, **kwargs):
        calls.append(args)
        return add_rms_norm(*args, **kwargs)

    monkeypatch.setattr(kernel, "triton_add_rms_norm", counted)
    net = tiny_model(torch.float32, mixer=family, n_layers=3)
    nn.init.normal_(net.norm.weight, 1.0, 0.1, generator=torch.Generator().manual_seed(2))  # not all 1: dw shows
    tokens = random_tokens(2, 24)
    results = {}
    for backend in ("torch", "triton"):
        for module in net.modules():
            if isinstance(module, AutocastRMSNorm):
                module.backend = backend
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            logits = net(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        results[backend] = loss.detach(), {name: p.grad for name, p in net.named_parameters()}
    assert len(calls) == 2 * 3  # every norm but the first block's mixer norm adds in the kernel
    (loss, grads), (loss_ref, grads_ref) = results["triton"], results["torch"]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=0)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():  # at most 9e-4 here
        ratio = ((grad - grads_ref[name]).norm() / grads_ref[name].norm()).item()
        assert ratio < 3e-3, f"{name}: ||triton - torch|| / ||torch|| = {ratio:.1e}"


@pytest.mark.parametrize("family, message", [
    ("gdn", "needs input_ids on a CUDA device; got cpu"),
    ("hybrid", "needs a model of Gated DeltaNet layers only"),
    ("attention", "needs a model of Gated DeltaNet layers only"),
])
def test_cuda_graph_true_raises_where_it_cannot_run(family, message):
    model = tiny_model(**FAMILIES[family])
    with pytest.raises(ValueError, match=f"cuda_graph=True {message}"):
        model.generate(random_tokens(2, 5), 3, cuda_graph=True)
    assert model.generate(random_tokens(2, 5), 3).shape == (2, 8)  # auto: the eager loop


def test_static_decoder_rejects_attention_layers():
    model = tiny_model(**FAMILIES["hybrid"])
    with torch.no_grad():
        _, cache = model(random_tokens(2, 5), use_cache=True)
    with pytest.raises(ValueError, match="Gated DeltaNet layers only"):
        StaticDecoder(model, cache)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-autocast"])
def test_cuda_graph_generate_equals_eager_on_gpu(precision):
    """Greedy tokens from replayed CUDA-graph steps equal the eager loop's (same kernels, same inputs), with
    bf16 weights and with fp32 weights under bf16 autocast (the graph then re-casts the weights each step)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=128, n_layers=2, num_heads=2, head_dim=64)
    model = LanguageModel(cfg).cuda().to(torch.bfloat16 if precision == "bf16" else torch.float32)
    prompt = torch.randint(0, cfg.vocab_size, (3, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        eager = model.generate(prompt, 24, cuda_graph=False)
        graph = model.generate(prompt, 24, cuda_graph=True)
        auto = model.generate(prompt, 24)
    assert torch.equal(graph, eager) and torch.equal(auto, eager)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_param_groups_split_decay_and_cover_every_parameter_once(tie_embeddings):
    model = tiny_model(n_layers=4, attention_every=2, tie_embeddings=tie_embeddings)
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in model.parameters()}
    no_decay_names = {name for name, p in model.named_parameters() if any(p is q for q in no_decay["params"])}
    assert no_decay_names == {name for name, p in model.named_parameters()
                              if name.endswith(("A_log", "dt_bias")) or "norm" in name}
    assert all(p.dim() >= 2 for p in decay["params"])


def test_num_params():
    untied, tied = tiny_model(), tiny_model(tie_embeddings=True)
    assert untied.num_params() - tied.num_params() == VOCAB * 32
    assert untied.num_params(exclude_embeddings=True) == tied.num_params(exclude_embeddings=True)
    assert untied.num_params() == sum(p.numel() for p in untied.parameters())


@pytest.mark.parametrize("overrides, message", [
    (dict(mixer="attention", d_model=130, attention_heads=4), "model.d_model=130 is not divisible"),
    (dict(n_layers=4, attention_every=2, d_model=200), "model.d_model=200 is not divisible"),
    (dict(mixer="attention", d_model=130, attention_heads=2), "even for RoPE"),
    (dict(mixer="mamba"), "model.mixer='mamba'"),
    (dict(expand_v=1.3), "model.expand_v=1.3"),
    (dict(attention_every=3), "model.attention_every=3 > model.n_layers=2"),
    (dict(mixer="attention", attention_every=2), "needs model.mixer=gdn"),
    (dict(attention_window=0), "model.attention_window=0"),
    (dict(num_heads=0), "model.num_heads=0"),
    (dict(position_embedding="alibi"), "model.position_embedding='alibi' is not one of"),
    (dict(norm="batchnorm"), "model.norm='batchnorm' is not one of"),
    (dict(position_embedding="learned"), "model.max_positions=None must be >= 1"),
    (dict(attention_bias=True), "model.attention_bias=True has no effect without attention layers"),
    (dict(decay="channel"), "model.decay=channel is GLA's gate without the delta rule"),
    (dict(decay="key"), "model.decay='key' is not one of"),
])
def test_validate_names_the_bad_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides).validate()
    with pytest.raises(ValueError, match=message):
        LanguageModel(ModelConfig(**overrides))


def test_gdn_model_needs_no_attention_head_divisibility():
    """d_model 130 has no even attention head size: fine for a model of GDN layers only, refused with attention."""
    ModelConfig(d_model=130).validate()
    with pytest.raises(ValueError, match="model.d_model=130"):
        ModelConfig(d_model=130, attention_every=2).validate()


@pytest.mark.parametrize("mixer", ["gdn", "attention"])
def test_tiny_model_overfits_a_fixed_batch(mixer):
    model = tiny_model(torch.float32, mixer=mixer)
    tokens = random_tokens(8, 24)
    optimizer = torch.optim.AdamW(model.param_groups(0.01), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_gdn_switches_are_rejected_without_gdn_layers():
    with pytest.raises(ValueError, match="model.use_gate=False has no effect with model.mixer=attention"):
        ModelConfig(mixer="attention", use_gate=False).validate()
    ModelConfig(mixer="gdn", attention_every=2, use_gate=False).validate()  # a hybrid keeps GDN layers


@pytest.mark.parametrize("family", ["gdn", "attention"])
def test_block_inputs_cast_once_under_autocast(family, monkeypatch):
    """Under bf16 autocast each block's normed input is cast to bf16 once (not once per Linear): the same logits
    as casting per Linear; the gradients (now added up in bf16) as close to float32 ones as before."""
    from gdn_exp import model as model_module

    net = tiny_model(torch.float32, mixer=family)
    tokens = random_tokens(2, 24)

    def run(autocast=True):
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = net(tokens)
        logits.square().mean().backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    _, exact = run(autocast=False)
    once, once_grads = run()

    def float32_norm(self, residual, delta=None):  # left in float32, autocast casts y once per Linear
        residual = residual if delta is None else residual + delta
        return torch.nn.RMSNorm.forward(self, residual), residual

    monkeypatch.setattr(model_module.AutocastRMSNorm, "forward", float32_norm)
    per_linear, per_linear_grads = run()
    assert torch.equal(once, per_linear)
    assert not torch.equal(once_grads, per_linear_grads)  # the cast-once path ran

    def error(grads):
        return ((grads - exact).norm() / exact.norm()).item()

    assert error(once_grads) < 1.2 * error(per_linear_grads)


def test_zoology_switches_build_zoology_attention_blocks():
    """Learned positions, no MLP, LayerNorm with bias, attention biases (0 at init), a tied head: the parameters
    are exactly those, V d + P d + L (4 d^2 + 6 d) + 2 d."""
    model = tiny_model(**FAMILIES["zoology_attention"])
    names = dict(model.named_parameters())
    assert names["position_embed.weight"].shape == (20, 32) and model.lm_head.weight is model.embed.weight
    assert not any(".mlp" in name for name in names) and all(block.mlp is None for block in model.blocks)
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.blocks[0].mixer_norm, nn.LayerNorm)
    for name in ("blocks.1.mixer.qkv_proj.bias", "blocks.1.mixer.o_proj.bias", "blocks.1.mixer_norm.bias", "norm.bias"):
        assert torch.count_nonzero(names[name]) == 0, name
    d, L = 32, 2
    assert model.num_params() == VOCAB * d + 20 * d + L * (4 * d * d + 6 * d) + 2 * d
    assert model.num_params(exclude_embeddings=True) == L * (4 * d * d + 6 * d) + 2 * d


@pytest.mark.parametrize("positions, order_matters", [("rope", True), ("learned", True), ("none", False)])
def test_learned_positions_replace_rotary_ones(positions, order_matters):
    """One attention layer sees its prefix as a set unless positions tell the tokens apart: RoPE does, and so does
    the learned table; with the table zeroed ("none") attention rotates nothing and shuffling the prefix leaves
    the last token's logits as they were."""
    learned = dict(position_embedding="learned", max_positions=16) if positions != "rope" else {}
    model = tiny_model(mixer="attention", n_layers=1, **learned)
    if positions == "none":
        nn.init.zeros_(model.position_embed.weight)
    tokens = random_tokens(2, 16)
    shuffled = torch.cat([tokens[:, :-1][:, torch.randperm(15, generator=torch.Generator().manual_seed(0))],
                          tokens[:, -1:]], dim=1)
    change = (model(tokens)[:, -1] - model(shuffled)[:, -1]).abs().max()
    assert (change > 1e-6) == order_matters, change


def test_learned_positions_refuse_longer_sequences_and_need_no_even_head_size():
    model = tiny_model(**FAMILIES["zoology_attention"])
    with pytest.raises(ValueError, match="a sequence of 21 tokens is longer than model.max_positions=20"):
        model(random_tokens(1, 21))
    _, cache = model(random_tokens(1, 20), use_cache=True)
    with pytest.raises(ValueError, match="a sequence of 21 tokens"):
        model(random_tokens(1, 1), cache=cache, use_cache=True)
    gdn = tiny_model(position_embedding="learned", max_positions=20)
    _, cache = gdn(random_tokens(1, 4), use_cache=True)
    with pytest.raises(ValueError, match="decoding with a cache needs an attention layer"):
        gdn(random_tokens(1, 1), cache=cache)
    ModelConfig(mixer="attention", d_model=130, attention_heads=2, position_embedding="learned",
                max_positions=8).validate()  # head size 65: odd is fine without RoPE


def test_layer_norm_of_the_residual_stream():
    """norm=layernorm: (residual, delta) -> (LayerNorm(residual + delta), residual + delta), y in the autocast
    dtype under autocast."""
    from gdn_exp.model import AutocastLayerNorm

    norm = AutocastLayerNorm(8, eps=1e-5)
    nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(0))
    nn.init.normal_(norm.bias, generator=torch.Generator().manual_seed(1))
    residual, delta = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    y, new_residual = norm(residual, delta)
    torch.testing.assert_close(new_residual, residual + delta, rtol=0, atol=0)
    torch.testing.assert_close(y, F.layer_norm(residual + delta, (8,), norm.weight, norm.bias, 1e-5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16, _ = norm(residual, delta.bfloat16())
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), y, rtol=1e-2, atol=2e-2)


def test_channel_decay_gives_each_key_channel_its_own_decay(monkeypatch):
    """decay=channel: the layer's g is [B, T, H, K], GLA's logsigmoid(x W1 W2 + b) / 16 from a rank-16 projection."""
    model = tiny_model(**FAMILIES["gla"])
    layer = model.blocks[0].mixer
    assert [p.shape for p in layer.a_proj.parameters()] == [(16, 32), (2 * 16, 16), (2 * 16,)]
    assert not hasattr(layer, "A_log") and not hasattr(layer, "b_proj")
    recorded = []
    layer.record = recorded.append
    model(random_tokens(2, 9))
    g = recorded[0]["g"]
    assert g.shape == (2, 9, 2, 16) and (g < 0).all() and g.std(dim=-1).min() > 0  # differs across channels
