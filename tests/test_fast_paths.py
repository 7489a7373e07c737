"""The step's fast paths, piece by piece against the code they replace (runtime/fast_paths.py).

Whole training steps with them on are compared with the all-off reference in the equivalence tests
(tests/test_parallel_equivalence.py, tests/test_asvr_model.py) and across a kill + resume
(tests/test_training_loop.py); here each piece meets its reference on its own, on CPU.
"""

import pytest
import torch
from megatron.core.optimizer import clip_grads
from megatron.core.tensor_parallel import layers
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_asvr.config import ConfigError, FastPathsConfig
from megatron_asvr.model.depth_mlps import BatchedLinear
from megatron_asvr.model.norms import RMSNorm, rms_norm_reference, rms_norm_torch
from megatron_asvr.runtime import fast_paths as fp
from megatron_asvr.runtime.fast_paths import FastPaths, WgradAccumulation, apply_megatron_patches, building, fuse_adam


def test_auto_is_on_with_cuda_and_off_on_cpu(monkeypatch):
    monkeypatch.delenv(fp.AUTO_ENV, raising=False)
    assert FastPaths.resolve(FastPathsConfig(), cuda=False) == FastPaths()
    gpu = FastPaths.resolve(FastPathsConfig(), cuda=True)
    assert (gpu.fused_adam, gpu.foreach_clip, gpu.wgrad_accumulation, gpu.bias_fusions, gpu.batched_head_mlp) == \
        (True,) * 5
    assert gpu.attention == "cudnn" and gpu.rms_norm == ("liger" if fp.have_liger() else "torch")
    off = FastPaths.resolve(FastPathsConfig(fused_adam=False, attention="math", rms_norm="reference"), cuda=True)
    assert (off.fused_adam, off.attention, off.rms_norm) == (False, "math", "reference")
    with pytest.raises(ConfigError, match="rms_norm=liger needs CUDA"):
        FastPaths.resolve(FastPathsConfig(rms_norm="liger"), cuda=False)
    monkeypatch.setenv(fp.AUTO_ENV, "on")  # every auto switch on, here with its CPU twin
    assert FastPaths.resolve(FastPathsConfig(), cuda=False) == FastPaths(True, True, True, True, "torch", "flash", True)
    assert FastPaths.resolve(FastPathsConfig(fused_adam=False), cuda=False).fused_adam is False
    monkeypatch.setenv(fp.AUTO_ENV, "off")  # bisecting a GPU run
    assert FastPaths.resolve(FastPathsConfig(), cuda=True) == FastPaths(cuda=True)
    monkeypatch.setenv(fp.AUTO_ENV, "yes")
    with pytest.raises(ConfigError, match=r"^ASVR_FAST_PATHS='yes': expected on or off"):
        FastPaths.resolve(FastPathsConfig(), cuda=False)


def test_transformer_changes_only_turn_fusions_on():
    assert FastPaths().transformer_changes() == ({}, {})
    every, llm = FastPaths(wgrad_accumulation=True, bias_fusions=True).transformer_changes()
    assert every == {"gradient_accumulation_fusion": True, "bias_dropout_fusion": True}
    assert llm == {"bias_activation_fusion": True}  # the head's exact GELU stays unfused


def test_foreach_norm_and_scale_match_megatrons_fallbacks():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=g) for shape in ((7, 3), (11,), (2, 5, 4))]
    grads[1] = grads[1].to(torch.bfloat16)  # pure bf16 runs clip bf16 gradients beside fp32 ones
    norm, _ = fp._foreach_l2_norm(0, None, [grads], False)
    assert norm.shape == (1,) and norm.dtype == torch.float32
    assert torch.allclose(norm, torch.cat([t.flatten().float() for t in grads]).norm().reshape(1), rtol=1e-6)
    scaled = [t.clone() for t in grads]
    fp._foreach_scale(0, None, [scaled, scaled], 0.25)  # in place, as clipping calls it
    assert all(torch.equal(s, t * 0.25) for s, t in zip(scaled, grads))
    out = [torch.empty_like(t, dtype=torch.bfloat16) for t in grads]  # fp32 -> bf16 and bf16 -> bf16
    fp._foreach_scale(0, None, [grads, out], 2.0)  # a copy across dtypes, as the optimizer calls it
    assert all(torch.equal(o, (t.to(torch.bfloat16) * 2)) for o, t in zip(out, grads))


def test_foreach_clip_scales_gradients_of_any_dtype():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    fp._foreach_clip_by_total_norm(params, max_norm=1.0, total_norm=4.0)
    assert all(torch.allclose(p.grad.float(), torch.full(p.shape, 0.5), atol=1e-2) for p in params)
    fp._foreach_clip_by_total_norm(params, max_norm=10.0, total_norm=4.0)  # under the limit: untouched
    assert torch.allclose(params[0].grad, torch.full((3,), 0.5), atol=1e-6)


def test_patches_apply_and_restore():
    original_norm, original_fusion = clip_grads.l2_norm_impl, layers._grad_accum_fusion_available
    try:
        apply_megatron_patches(FastPaths(foreach_clip=True, wgrad_accumulation=True))
        assert clip_grads.l2_norm_impl is fp._foreach_l2_norm
        assert layers._grad_accum_fusion_available and layers.fused_weight_gradient_mlp_cuda is WgradAccumulation
    finally:
        apply_megatron_patches(FastPaths())
    assert clip_grads.l2_norm_impl is original_norm and layers._grad_accum_fusion_available == original_fusion


@pytest.mark.parametrize("batch", [(), (4,)])  # a linear layer's, or the batched depth MLPs'
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wgrad_accumulates_into_fp32_main_grad(dtype, batch):
    g = torch.Generator().manual_seed(1)
    inp, gout = torch.randn(*batch, 12, 5, generator=g).to(dtype), torch.randn(*batch, 12, 3, generator=g).to(dtype)
    main_grad = torch.randn(*batch, 3, 5, generator=g)
    expected = main_grad + gout.float().mT @ inp.float()
    WgradAccumulation.wgrad_gemm_accum_fp32(inp, gout, main_grad)
    tol = 1e-6 if dtype == torch.float32 else 3e-2  # bf16 products on CPU: the GEMM's own rounding
    assert main_grad.dtype == torch.float32 and torch.allclose(main_grad, expected, atol=tol, rtol=tol)


def test_batched_linear_puts_its_weight_gradient_in_main_grad():
    """The batched depth MLPs' GEMM (model/depth_mlps.py) under megatron's DDP protocol: the weight gradient
    added to main_grad, a dummy returned with grad_added_to_main_grad set; the input gradient unchanged."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 5, generator=g)
    weight = torch.nn.Parameter(torch.randn(3, 4, 5, generator=g))
    gout = torch.randn(3, 7, 4, generator=g)
    plain = x.clone().requires_grad_(True)
    torch.autograd.backward(torch.bmm(plain, weight.mT), gout)
    expected_dw, weight.grad = weight.grad, None
    start = torch.randn(3, 4, 5, generator=g)
    weight.main_grad, weight.grad_added_to_main_grad = start.clone(), False
    fused = x.clone().requires_grad_(True)
    torch.autograd.backward(BatchedLinear.apply(fused, weight, True), gout)
    assert weight.grad_added_to_main_grad and weight.grad.shape == weight.shape
    assert torch.allclose(weight.main_grad, start + expected_dw, atol=1e-6)
    assert torch.equal(fused.grad, plain.grad)


def test_torch_rms_norm_matches_the_reference_both_ways():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 64, generator=g, requires_grad=True)
    w = (1 + 0.1 * torch.randn(64, generator=g)).requires_grad_()
    outs = []
    for kernel in (rms_norm_reference, rms_norm_torch):
        y = kernel(x, w, 1e-5)
        dx, dw = torch.autograd.grad((y * torch.arange(64.0)).sum(), (x, w))
        outs.append((y, dx, dw))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=2e-6, rtol=1e-5)
    xb, wb = x.detach().to(torch.bfloat16), w.detach().to(torch.bfloat16)  # one rounding instead of two
    ref, fast = rms_norm_reference(xb, wb, 1e-5).float(), rms_norm_torch(xb, wb, 1e-5).float()
    assert ((ref - fast).abs() <= ref.abs() * 2**-6).all() and (ref != fast).any()


def _config(**kwargs) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, **kwargs)


def test_modules_take_the_kernels_chosen_when_built():
    assert RMSNorm(_config(), 32).kernel is rms_norm_reference
    with building(FastPaths(rms_norm="torch")):
        assert RMSNorm(_config(), 32).kernel is rms_norm_torch
    assert RMSNorm(_config(), 32).kernel is rms_norm_reference


def test_attention_backends_give_the_same_attention():
    """The math kernel (the reference) and SDPA's CPU flash kernel, chosen through the switch, on GQA."""
    from megatron_asvr.model.attention import SDPAttention

    config = _config(num_query_groups=2, attention_dropout=0.0)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(16, 2, 4, 8, generator=g)  # [s, b, heads, hn]
    k, v = torch.randn(16, 2, 2, 8, generator=g), torch.randn(16, 2, 2, 8, generator=g)
    outs = {}
    for backend in ("math", "flash"):
        paths = FastPaths(attention=backend)
        with building(paths):
            attention = SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=_single_tp())
        assert attention.backends == paths.sdpa_backends()
        outs[backend] = attention(q, k, v, None)
    assert torch.allclose(outs["math"], outs["flash"], atol=1e-5)
    assert FastPaths(attention="cudnn").sdpa_backends()[0].name == "CUDNN_ATTENTION"
    assert len(FastPaths(attention="cudnn").sdpa_backends()) == 4  # the others as fallbacks


def _single_tp():
    from types import SimpleNamespace

    return SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))


def _adam_steps(fused: bool, state=None):
    torch.manual_seed(4)
    model = torch.nn.Linear(6, 4)
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    holder = type("MegatronLike", (), {"optimizer": adam})()  # megatron's optimizer holds torch's as .optimizer
    if state is not None:
        adam.load_state_dict(state)
    fuse_adam(holder, fused)
    for step in range(3):
        model.zero_grad()
        model(torch.full((2, 6), float(step + 1))).pow(2).sum().backward()
        adam.step()
    return model, adam


def test_fused_adam_steps_as_foreach_and_resumes_from_an_unfused_state():
    foreach, adam = _adam_steps(False)
    fused, fused_adam = _adam_steps(True)
    assert fused_adam.param_groups[0]["fused"] and fused_adam.defaults["fused"]
    for a, b in zip(foreach.parameters(), fused.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # A checkpoint of the unfused run resumed fused: the groups' flags are set again, step is a tensor.
    _, resumed = _adam_steps(True, adam.state_dict())
    assert resumed.param_groups[0]["fused"] and resumed.param_groups[0]["foreach"] is False
    steps = [s["step"] for s in resumed.state.values()]
    assert all(torch.is_tensor(s) and s.dtype == torch.float32 and s.item() == 6 for s in steps)
