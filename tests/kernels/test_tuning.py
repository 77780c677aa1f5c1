"""kernels.tuning: saved launch configurations, and the launchers that use them."""
import json

import pytest
import torch

from kernels import tuning
from tests.helpers import record_launches


@pytest.fixture
def tuned_files(tmp_path, monkeypatch):
    """An empty shipped file and an empty user file, read afresh."""
    shipped, user = tmp_path / "shipped.json", tmp_path / "user.json"
    monkeypatch.setattr(tuning, "SHIPPED", str(shipped))
    monkeypatch.setenv("COMPOSER_TUNED", str(user))
    tuning.reload()
    yield shipped, user
    tuning.reload()


def test_nothing_saved_means_no_entry(tuned_files):
    assert tuning.table() == {}
    assert tuning.lookup("attention", "forward", "cpu", torch.float32, "N20 D16") is None


def test_save_keeps_other_entries_and_user_entries_win(tuned_files):
    shipped, user = tuned_files
    shipped.write_text(json.dumps({"configs": {"a/forward/cpu/float32/N1": {"X": 1},
                                               "a/forward/cpu/float32/N2": {"X": 2}}}))
    tuning.save({"a/forward/cpu/float32/N2": {"X": 20}})
    tuning.save({"a/forward/cpu/float32/N3": {"X": 3}})
    assert json.loads(user.read_text())["configs"] == {"a/forward/cpu/float32/N2": {"X": 20},
                                                       "a/forward/cpu/float32/N3": {"X": 3}}
    assert [tuning.lookup("a", "forward", "cpu", torch.float32, f"N{i}") for i in (1, 2, 3)] == [
        {"X": 1}, {"X": 20}, {"X": 3}]
    # another card or dtype never sees them
    assert tuning.lookup("a", "forward", "cpu", torch.float16, "N1") is None
    # a caller changing what it got does not change the table
    tuning.lookup("a", "forward", "cpu", torch.float32, "N1")["X"] = 99
    assert tuning.lookup("a", "forward", "cpu", torch.float32, "N1") == {"X": 1}


@pytest.mark.parametrize("text", ["{not json", '["a list"]', '{"configs": 3}'])
def test_a_broken_file_is_ignored_with_a_warning(tuned_files, text):
    _, user = tuned_files
    user.write_text(text)
    with pytest.warns(UserWarning, match="ignoring"):
        assert tuning.table() == {}


def test_attention_launchers_use_saved_configurations(tuned_files, device, monkeypatch):
    from kernels.attention import triton as kt

    n, d = 20, 16
    q, k, v, do = (torch.randn(1, 2, n, d, device=device) for _ in range(4))
    expected = kt.forward(q, k, v, 0.25)[0]
    fwd = {"BLOCK_M": 16, "BLOCK_N": 16, "TAIL": 0, "num_warps": 4, "num_stages": 1}
    bwd = {"BLOCK": 16, "BLOCK_STEP": 16, "FUSED_DELTA": True, "num_warps": 4, "num_stages": 1}
    tuning.save({tuning.key("attention", "forward", device, q.dtype, f"N{n} D{d}"): fwd,
                 tuning.key("attention", "backward", device, q.dtype, f"N{n} D{d}"): bwd})
    launches = record_launches(monkeypatch, kt)
    out, lse2 = kt.forward(q, k, v, 0.25)
    kt.backward(do, q, k, v, out, lse2, 0.25)
    assert [name for name, _ in launches] == ["_attn_fwd", "_attn_bwd_tiled"]   # fused delta: no delta kernel
    assert launches[0][1]["BLOCK_M"] == 16 and launches[1][1]["BLOCK"] == 16
    torch.testing.assert_close(out, expected)


def test_token_mlp_and_dwconv_launchers_use_saved_configurations(tuned_files, device, monkeypatch):
    from kernels.dwconv import triton as dt
    from kernels.token_mlp import gemms
    from kernels.token_mlp import triton as kt

    B, N, C, Hd = 2, 20, 16, 16
    x, dy = torch.randn(B, N, C, device=device), torch.randn(B, N, C, device=device)
    p = [torch.randn(*s, device=device) for s in ((C,), (C,), (Hd, N), (Hd,), (N, Hd), (N,))]
    split = gemms.split_blocks(N, C, Hd, x.dtype, backward=True)
    key = f"N{N} C{C} Hd{Hd}"
    tuning.save({tuning.key("token_mlp", "backward", device, x.dtype, key): {"data": split,
                                                                              "weights": {"method": "splitk"}}})
    assert kt.backward_config(x, Hd) == {"data": split, "weights": {"method": "splitk"}}
    launches = record_launches(monkeypatch, gemms)
    _, mean, rstd = kt.forward(x, *p, 1e-5)
    kt.backward(dy, x, p[0], p[1], p[2], p[3], p[4], mean, rstd)
    assert [name for name, _ in launches] == ["_hidden_kernel", "_tokens_kernel", "_contract_bc_kernel",
                                              "_contract_bc_kernel"]

    xc = torch.randn(2, 3, 12, 12, device=device)
    tile = {"method": "toeplitz", "BLOCK_C": 2, "TILE_H": 16, "num_warps": 4, "IMAGES": 2}
    tuning.save({tuning.key("dwconv2d", "forward", device, xc.dtype, "C3 12x12 k5 NCHW"): tile})
    assert dt.forward_tile(xc, 5) == tile
    assert dt.forward_tile(xc.to(memory_format=torch.channels_last), 5) != tile   # another layout


def test_dwconv_input_gradient_has_its_own_saved_configuration(tuned_files, device, monkeypatch):
    """The input gradient (the flipped forward) looks up "input grad", never the forward's saved
    winner: a forward winner can lose as the input gradient (and the other way round)."""
    from kernels.dwconv import toeplitz
    from kernels.dwconv import triton as dt

    x = torch.randn(2, 3, 12, 12, device=device)
    dy = torch.randn_like(x)
    w = torch.randn(3, 1, 7, 7, device=device)
    key = "C3 12x12 k7 NCHW"
    forward = {"method": "toeplitz", "BLOCK_C": 2, "TILE_H": 16, "num_warps": 4, "IMAGES": 2}
    tuning.save({tuning.key("dwconv2d", "forward", device, x.dtype, key): forward})
    assert dt.forward_tile(x, 7) == forward
    assert dt.forward_tile(x, 7, role="input grad") == dt.TOEPLITZ_FORWARD   # the built-in rule
    input_grad = {"elems": 1024, "c_bytes": 64}    # the tap kernel: easy to tell apart
    tuning.save({tuning.key("dwconv2d", "input grad", device, x.dtype, key): input_grad})
    assert dt.forward_tile(x, 7, role="input grad") == input_grad
    launches = record_launches(monkeypatch, dt, toeplitz)
    dt.conv_backward(dy, x, w, None, gelu=False, has_bias=False, need_dx=True, need_dw=False)
    assert [name for name, _ in launches] == ["_dwconv_fwd_kernel"]
    assert launches[0][1]["FLIP"] is True


def _shipped_entries() -> list[tuple[str, str, str, str, str]]:
    """(op, role, arch, dtype, shape) of every configuration kernels/tuned.json ships."""
    with open(tuning.SHIPPED) as f:
        return sorted(tuple(key.split("/")) for key in json.load(f)["configs"])


@pytest.mark.gpu
@pytest.mark.parametrize("op,role,arch,dtype,shape", _shipped_entries(), ids=["/".join(e) for e in _shipped_entries()])
def test_tuned_configurations_match_fp64(op, role, arch, dtype, shape, device):
    """Every shipped configuration, on the card it was measured on, at its shape (batch 2: the
    batch is not part of the key): outputs and gradients against fp64 under each op's rule."""
    import re

    if tuning.arch(device) != arch:
        pytest.skip(f"saved for {arch}; this card is {tuning.arch(device)}")
    torch_dtype = getattr(torch, dtype)
    assert tuning.lookup(op, role, device, torch_dtype, shape) is not None   # the entry is the one in force
    if op == "attention":
        from tests.kernels.test_attention import check_attention, packed_qkv

        n, d = (int(v) for v in re.fullmatch(r"N(\d+) D(\d+)", shape).groups())
        gen = torch.Generator().manual_seed(0)
        check_attention(*packed_qkv(2, 3, n, d, dtype=torch_dtype, device=device, gen=gen), gen=gen)
    elif op == "token_mlp":
        from tests.kernels.test_token_mlp import check_against_fp64

        n, c, hd = (int(v) for v in re.fullmatch(r"N(\d+) C(\d+) Hd(\d+)", shape).groups())
        check_against_fp64(2, n, c, hd, torch_dtype, device)
    elif op == "dwconv2d":
        from tests.kernels.test_dwconv import check

        c, h, w, k, layout = re.fullmatch(r"C(\d+) (\d+)x(\d+) k(\d+) (NCHW|channels_last)", shape).groups()
        check(2, int(c), int(h), int(w), int(k), torch_dtype, device, channels_last=layout == "channels_last")
    else:
        pytest.fail(f"no check for {op}: add one here")
