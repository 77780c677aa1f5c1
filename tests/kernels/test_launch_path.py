"""Eager calls of the public ops launch their Triton kernels directly.

Torch's higher-order-op dispatch around a launch (what `torch.library.wrap_triton` does
unless launches are direct) costs the host about ten times a direct launch and records
every launch in a side table that only grows. Only tracing (torch.compile) needs it.
"""
import pytest
import torch

import kernels
from kernels.benchmarking import hop_launches


def _attention(device, dtype):
    q, k, v = (torch.randn(2, 3, 20, 16, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = kernels.attention(q, k, v, backend="triton")
    return out, (q, k, v)


def _token_mlp(device, dtype):
    x = torch.randn(2, 16, 32, device=device, dtype=dtype, requires_grad=True)
    params = [torch.randn(*s, device=device, dtype=dtype, requires_grad=True)
              for s in ((32,), (32,), (16, 16), (16,), (16, 16), (16,))]
    return kernels.token_mlp(x, *params, backend="triton"), (x, *params)


def _dwconv(device, dtype):
    x = torch.randn(2, 3, 8, 8, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(3, device=device, dtype=dtype, requires_grad=True)
    return kernels.dwconv2d(x, w, b, activation="gelu", backend="triton"), (x, w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [_attention, _token_mlp, _dwconv], ids=["attention", "token_mlp", "dwconv2d"])
def test_eager_forward_backward_launches_directly(make, device):
    def forward_backward():
        out, inputs = make(device, torch.bfloat16)
        torch.autograd.grad(out, inputs, torch.randn_like(out))

    forward_backward()   # compiles
    assert hop_launches(forward_backward) == 0


def test_hop_launches_counts_side_table_entries():
    """The diagnostic itself: one entry in torch's kernel side table per dispatched launch."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    key = max(kernel_side_table.constant_args, default=0) + 1000

    def two_dispatched_launches():
        kernel_side_table.constant_args[key] = {}
        kernel_side_table.constant_args[key + 1] = {}

    try:
        assert hop_launches(two_dispatched_launches) == 2
        assert hop_launches(lambda: None) == 0
    finally:
        for k in (key, key + 1):
            kernel_side_table.constant_args.pop(k, None)


@pytest.mark.parametrize("kind", ["attention", "token_mlp", "dwconv"])
def test_blocks_with_parameter_weights_take_the_eager_path(kind, monkeypatch, device):
    """Inside a model the weights are nn.Parameters: the blocks must still take the plain
    autograd.Function path (launches stubbed; the library ops are made to fail)."""
    from composer.blocks.attention import Attention
    from composer.blocks.dwconv import DwConv
    from composer.blocks.token_mlp import TokenMlp
    from kernels import host_cost
    from kernels.attention import op as attention_op
    from kernels.dwconv import op as dwconv_op
    from kernels.token_mlp import op as token_mlp_op

    def library_path(*args, **kwargs):
        raise AssertionError("a block with nn.Parameter weights went through the torch.library op")

    for module, name in ((attention_op, "_attention_packed_fwd"), (token_mlp_op, "_token_mlp_fwd"),
                         (dwconv_op, "_dwconv2d_fwd")):
        monkeypatch.setattr(module, name, library_path)
    block, x = {"attention": (Attention(32, 2, backend="triton"), torch.randn(2, 16, 32)),
                "token_mlp": (TokenMlp(32, 16, 16, backend="triton"), torch.randn(2, 16, 32)),
                "dwconv": (DwConv(8, 9, backend="triton"), torch.randn(2, 8, 16, 16))}[kind]
    block, x = block.to(device), x.to(device)
    assert all(type(p) is torch.nn.Parameter for p in block.parameters())
    with host_cost.stubbed_launches() as counts:
        block(x.requires_grad_()).sum().backward()
    assert sum(counts.values()) >= 2, counts


def test_register_cap_reaches_direct_launches_only(monkeypatch):
    """A configuration's "maxnreg" is a launch option on direct launches; on torch's traced path
    (wrap_triton enabled, outside the interpreter), which would pass it to the kernel as an
    argument, it is dropped."""
    from kernels import dispatch

    monkeypatch.setattr(dispatch, "interpreter_mode", lambda: False)
    assert dispatch.launch_options({"num_warps": 8}) == {}
    with dispatch.direct_launch():
        assert dispatch.launch_options({"maxnreg": 128}) == {"maxnreg": 128}
    assert dispatch.launch_options({"maxnreg": 128}) == {}    # traced: torch's wrapper would refuse it
    monkeypatch.setattr(dispatch, "interpreter_mode", lambda: True)
    assert dispatch.launch_options({"maxnreg": 128}) == {"maxnreg": 128}   # interpreted: no wrapper
