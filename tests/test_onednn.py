"""The linear layers' oneDNN kernel (`clip_rc.onednn`): equal to `F.linear` (values and gradients), taken only where
it applies, used by every linear layer of the model and by the blocked attention, and counted by the FLOP counter."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_rc import fused_ops, modeling_clip_rc, onednn
from clip_rc.modeling_clip_rc import CLIPRCLinear
from clip_rc.profiling import count_flops

from .conftest import tiny_model, without_dropout


pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Force the oneDNN kernel (whatever this processor's timing says) and count its calls."""
    onednn.onednn_linear_speedup(torch.get_num_threads())  # timed before the kernel is counted
    calls = []
    kernel = onednn._onednn_linear

    def counted(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    monkeypatch.setattr(onednn, "MIN_ONEDNN_SPEEDUP", 0.0)
    monkeypatch.setattr(onednn, "_onednn_linear", counted)
    return calls


@pytest.mark.parametrize("input_shape", [(7, 24), (2, 33, 24), (2, 3, 5, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_f_linear_with_its_gradients(onednn_calls, input_shape, with_bias):
    torch.manual_seed(0)
    inputs = torch.randn(input_shape, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=True)
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    upstream = torch.randn(*input_shape[:-1], 40)

    outputs = onednn.linear(inputs, weight, bias)
    expected = F.linear(inputs, weight, bias)
    assert onednn_calls, "the oneDNN kernel did not run"
    assert outputs.shape == expected.shape
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-5)

    parameters = [inputs, weight] + ([bias] if with_bias else [])
    gradients = torch.autograd.grad((outputs * upstream).sum(), parameters)
    expected_gradients = torch.autograd.grad((expected * upstream).sum(), parameters)
    assert len(onednn_calls) == 3  # the input and weight gradients too
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("upstream_layout", ["dense", "transposed view"])
def test_the_gradients_read_transposed_operands_and_any_upstream_layout(onednn_calls, upstream_layout):
    """The backward pass hands oneDNN transposed views of the rows, the weight and the upstream gradient (made dense
    first when it arrives as a strided view): the same gradients as the default kernel's."""
    torch.manual_seed(0)
    rows = torch.randn(37, 24, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    upstream = torch.randn(37, 40) if upstream_layout == "dense" else torch.randn(40, 37).t()
    outputs = onednn._OneDNNLinear.apply(rows, weight, bias)
    gradients = torch.autograd.grad(outputs, [rows, weight, bias], upstream)
    expected = torch.autograd.grad(F.linear(rows, weight, bias), [rows, weight, bias], upstream)
    assert len(onednn_calls) == 3
    for gradient, expected_gradient in zip(gradients, expected):
        assert gradient.is_contiguous()
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-5)


def test_outputs_can_be_modified_in_place_under_autograd(onednn_calls):
    inputs = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(6, 8)
    outputs = F.relu(onednn.linear(inputs, weight), inplace=True)
    outputs.sum().backward()
    expected_gradient = (F.linear(inputs, weight) > 0).float() @ weight
    torch.testing.assert_close(inputs.grad, expected_gradient)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # from mkldnn.flags(), about GPUs
@pytest.mark.parametrize(
    "case",
    ["bf16 autocast", "bf16 tensors", "strided weight", "oneDNN disabled", "slower than the default", "traced"],
)
def test_the_default_kernel_runs_where_onednn_does_not_apply(onednn_calls, monkeypatch, case):
    inputs, weight = torch.randn(4, 8), torch.randn(6, 8)
    expected_dtype = torch.float32
    if case == "bf16 autocast":
        context, expected_dtype = torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16
    elif case == "bf16 tensors":
        inputs, weight, expected_dtype = inputs.bfloat16(), weight.bfloat16(), torch.bfloat16
        context = torch.no_grad()
    elif case == "strided weight":
        weight = torch.randn(8, 6).t()
        context = torch.no_grad()
    elif case == "oneDNN disabled":
        context = torch.backends.mkldnn.flags(enabled=False)
    elif case == "slower than the default":
        monkeypatch.setattr(onednn, "MIN_ONEDNN_SPEEDUP", float("inf"))
        context = torch.no_grad()
    else:
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
        context = torch.no_grad()
    with context:
        outputs = onednn.linear(inputs, weight)
    assert onednn_calls == []
    assert outputs.dtype == expected_dtype
    torch.testing.assert_close(outputs.float(), F.linear(inputs.float(), weight.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("num_queries", "num_keys"), [(5, 7), (150, 40), (70, 3000)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_blocked_attention_equals_sdpa_through_onednn(onednn_calls, monkeypatch, num_queries, num_keys, with_mask):
    """fp32 through oneDNN's products, per head and block of queries (blocks of 64 rows here: several blocks and a
    partial last one), with an additive mask that broadcasts over images and heads as the image tower's region mask
    does; values and gradients."""
    monkeypatch.setattr(fused_ops, "ATTENTION_SCORES_PER_BLOCK", 1)
    torch.manual_seed(0)
    query = torch.randn(2, num_queries, 3, 16).transpose(1, 2).requires_grad_()
    key, value = (torch.randn(2, num_keys, 3, 16).transpose(1, 2).requires_grad_() for _ in range(2))
    grad_output = torch.randn(2, 3, num_queries, 16)
    mask = None
    if with_mask:
        allowed = torch.rand(num_queries, num_keys) < 0.7
        allowed[:, 0] = True
        mask = torch.zeros(1, 1, num_queries, num_keys).masked_fill(~allowed, torch.finfo(torch.float32).min)
    attended = fused_ops.blocked_attention(query, key, value, scale=0.3, additive_mask=mask)
    blocks = -(-num_queries // fused_ops.MIN_QUERIES_PER_BLOCK)
    assert len(onednn_calls) == 2 * 3 * blocks * 2  # two products per (image, head, block)
    gradients = torch.autograd.grad(attended, (query, key, value), grad_output)
    assert len(onednn_calls) == 2 * 3 * blocks * 5  # and three more for the gradients

    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3)
    expected_gradients = torch.autograd.grad(expected, (query, key, value), grad_output)
    torch.testing.assert_close(attended, expected, rtol=1e-5, atol=1e-6)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn_faster", [True, False])
def test_attention_modules_use_blocked_attention_where_onednn_is_faster_or_for_cpu_dropout(
    onednn_calls, monkeypatch, onednn_faster
):
    """With oneDNN faster, the image tower's and the decode head's attention go through `blocked_attention` in
    inference and training; without, only the decode head's training attention does (its dropout)."""
    if not onednn_faster:
        monkeypatch.setattr(onednn, "MIN_ONEDNN_SPEEDUP", float("inf"))
    monkeypatch.setattr(modeling_clip_rc, "MIN_BLOCKED_ATTENTION_SCORES", 0)  # the tiny model's maps count
    model = tiny_model()
    assert model.config.decoder_attention_dropout > 0
    pixel_values, labels = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long)
    attention_calls = []
    attention = fused_ops.blocked_attention

    def recorded(*args, **kwargs):
        attention_calls.append(args[0].shape)
        return attention(*args, **kwargs)

    monkeypatch.setattr("clip_rc.modeling_clip_rc.blocked_attention", recorded)
    tower_layers = model.config.vision_config.num_hidden_layers
    # The decode head's query and pixel layers, the recovery decoder's in training.
    head_layers = 2 * model.config.decoder_num_layers
    recovery_layers = 2 * model.config.recovery_num_layers
    with torch.no_grad():
        model.eval()(pixel_values=pixel_values)
    assert len(attention_calls) == (tower_layers + head_layers if onednn_faster else 0)
    attention_calls.clear()
    model.train()(pixel_values=pixel_values, labels=labels).loss.backward()
    expected = tower_layers + head_layers + recovery_layers if onednn_faster else head_layers + recovery_layers
    assert len(attention_calls) == expected


def training_tower_attention(monkeypatch, dropout: float):
    """A tiny image-tower attention module in training with `dropout`, and the list of its `blocked_attention`
    calls (recorded, not run: the queries come back as the attended states)."""
    attention = tiny_model().clip_rc.vision_model.encoder.layers[0].self_attn.train()
    attention.dropout = dropout
    calls = []
    monkeypatch.setattr(
        "clip_rc.modeling_clip_rc.blocked_attention", lambda *args, **kwargs: calls.append(args) or args[0]
    )
    return attention, calls


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_cpu_training_with_attention_dropout_takes_blocked_attention_with_an_additive_mask_only(
    monkeypatch, mask_dtype
):
    """Without oneDNN, dropout alone sends CPU training through `blocked_attention`, which adds its mask: a boolean
    mask stays with SDPA."""
    monkeypatch.setattr(onednn, "MIN_ONEDNN_SPEEDUP", float("inf"))
    monkeypatch.setattr(modeling_clip_rc, "MIN_BLOCKED_ATTENTION_SCORES", 0)
    attention, calls = training_tower_attention(monkeypatch, dropout=0.1)
    hidden_states = torch.randn(1, 5, attention.embed_dim, requires_grad=True)
    allowed = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask = allowed if mask_dtype == torch.bool else torch.zeros(1, 1, 5, 5)
    attention(hidden_states, mask)
    assert len(calls) == (0 if mask_dtype == torch.bool else 1)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_small_attention_maps_stay_with_sdpa(onednn_calls, monkeypatch, dropout):
    """Below `MIN_BLOCKED_ATTENTION_SCORES` per head, SDPA's batched kernel is the faster one, in inference and in
    training with dropout: a 5-token self-attention goes to SDPA, a 9-token one (81 scores) with the bound at 81 to
    `blocked_attention`."""
    monkeypatch.setattr(modeling_clip_rc, "MIN_BLOCKED_ATTENTION_SCORES", 81)
    attention, calls = training_tower_attention(monkeypatch, dropout)
    for num_tokens, expected_calls in ((5, 0), (9, 1)):
        attention(torch.randn(1, num_tokens, attention.embed_dim, requires_grad=True))
        assert len(calls) == expected_calls


def test_every_linear_layer_of_the_model_uses_the_kernel_and_keeps_its_weight_names():
    model = tiny_model()
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert linears and all(type(module) is CLIPRCLinear for module in linears)
    names = set(model.state_dict())
    assert "clip_rc.vision_model.encoder.layers.0.mlp.fc1.weight" in names
    assert "clip_rc.text_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "decode_head.decoder_q.0.linear1.weight" in names


def test_the_model_gives_the_default_kernels_results_and_gradients(monkeypatch):
    """A training step (losses and every gradient) and the inference logits, oneDNN forced on (the blocked attention
    too) against forced off."""
    monkeypatch.setattr(modeling_clip_rc, "MIN_BLOCKED_ATTENTION_SCORES", 0)
    model = tiny_model(without_dropout(setting="transductive"))
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))

    def step(min_speedup):
        monkeypatch.setattr(onednn, "MIN_ONEDNN_SPEEDUP", min_speedup)
        model.zero_grad()
        outputs = model(pixel_values=pixel_values, labels=labels)
        outputs.loss.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            logits = model.eval()(pixel_values=pixel_values).logits
        model.train()
        return outputs.loss.detach(), gradients, logits

    loss, gradients, logits = step(0.0)
    expected_loss, expected_gradients, expected_logits = step(float("inf"))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert gradients.keys() == expected_gradients.keys() and len(gradients) > 10
    for name, gradient in gradients.items():
        # Float rounding of sums over many terms: within 1e-5 of the gradient's own scale (1e-9 for gradients that
        # are zero up to rounding, such as key biases under softmax).
        scale = expected_gradients[name].abs().max().item()
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-5, atol=1e-5 * scale + 1e-9, msg=name)


def test_flops_are_counted_like_f_linear_and_without_the_kernel_timing(onednn_calls):
    onednn.onednn_linear_speedup.cache_clear()
    inputs, weight = torch.randn(3, 10, 16, requires_grad=True), torch.randn(12, 16)
    forward_and_backward = 2 * (2 * 30 * 16 * 12)
    assert count_flops(lambda: onednn.linear(inputs, weight).sum().backward()) == forward_and_backward
    assert onednn_calls


def test_flops_are_the_same_through_onednn_and_the_default_kernels(onednn_calls, monkeypatch):
    """Inference and a training step: the blocked attention's products count what SDPA's formulas count (the
    backward pass's recomputed scores included)."""
    monkeypatch.setattr(modeling_clip_rc, "MIN_BLOCKED_ATTENTION_SCORES", 0)
    model = tiny_model(without_dropout())
    pixel_values, labels = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long)

    def inference():
        with torch.no_grad():
            model.eval()(pixel_values=pixel_values)

    def training_step():
        model.train()(pixel_values=pixel_values, labels=labels).loss.backward()

    through_onednn = count_flops(inference), count_flops(training_step)
    assert onednn_calls
    monkeypatch.setattr(onednn, "MIN_ONEDNN_SPEEDUP", float("inf"))
    assert through_onednn == (count_flops(inference), count_flops(training_step))
    assert 0 < through_onednn[0] < through_onednn[1]


def test_the_speedup_is_measured_once_per_thread_count():
    onednn.onednn_linear_speedup.cache_clear()
    threads = torch.get_num_threads()
    speedup = onednn.onednn_linear_speedup(threads)
    assert speedup > 0
    assert onednn.onednn_linear_speedup(threads) == speedup
    assert onednn.onednn_linear_speedup.cache_info().misses == 1


def test_a_kernel_that_fails_to_run_leaves_the_default_kernel(monkeypatch):
    """The oneDNN op is internal to PyTorch: if a future version changes it, the timing fails and F.linear serves."""

    def changed_signature(*args):
        raise TypeError("_linear_pointwise() takes 4 arguments")

    onednn.onednn_linear_speedup.cache_clear()
    monkeypatch.setattr(onednn, "_onednn_linear", changed_signature)
    inputs, weight = torch.randn(4, 8), torch.randn(6, 8)
    try:
        assert onednn.onednn_linear_speedup(torch.get_num_threads()) == 0.0
        torch.testing.assert_close(onednn.linear(inputs, weight), F.linear(inputs, weight))
    finally:
        onednn.onednn_linear_speedup.cache_clear()
