"""The sparse kernels (distributed_sae.kernels): Triton kernels under the interpreter, the
pure-torch path, the dispatch point, and a TopK training step sparse vs dense.

Triton's interpreter must be switched on (TRITON_INTERPRET=1) before triton's @jit decorators
run, and another test module of the same session may already have imported the kernels, so the
interpreter tests (test_interp_*) run in a pytest subprocess started by
test_triton_kernels_pass_under_the_interpreter; conftest.py deselects them in the parent process.

Tolerances, as max |error| / max |reference| (a scale-free relative error):
* fp32: the kernels sum k (or the pairs of a latent) terms in another order than a dense
  matmul; each sum rounds at ~k·2^-24 ≈ 2e-6 relative for k <= 32 -> 1e-5.
* fp16: inputs are fp16 for both sides and the kernels accumulate in fp32, so the error is the
  final rounding to fp16 (2^-11 ≈ 4.9e-4 relative) plus the reference's own fp16 rounding of
  its matmul outputs -> 2e-3.
* bf16 (GPU only: the interpreter gets bf16 wrong): 8 mantissa bits, 2^-8 ≈ 3.9e-3 -> 2e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from distributed_sae.kernels import (TopKCode, backend_for, requested_backend, sparse_decode,
                                     topk_encode, use_backend)
from distributed_sae.kernels import dispatch, select, torch_sparse
from distributed_sae.kernels.reference import decode_reference, topk_encode_reference
from conftest import HANG_S

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (batch, d, n, k): d not a power of two, n not a multiple of any block, k = 1.
SHAPES = [(37, 72, 100, 5), (19, 40, 33, 1), (64, 24, 200, 8)]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _decode_inputs(shape, dtype, device="cpu", seed=0):
    batch, d, n, k = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(d, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(batch, k, generator=g).to(device, dtype).requires_grad_()
    idx = torch.randint(0, n, (batch, k), generator=g)
    if k > 1:
        idx[::2, 1] = idx[::2, 0]  # repeated latents within a token must add
    grad = torch.randn(batch, d, generator=g).to(device, dtype)
    return v, idx.to(device), w, b, grad


def check_decode(backend: str, shape, dtype, device="cpu") -> None:
    v, idx, w, b, grad = _decode_inputs(shape, dtype, device)
    with use_backend(backend):
        out = sparse_decode(v, idx, w, b)
        grads = torch.autograd.grad(out, (v, w, b), grad)
    ref = decode_reference(v, idx, w, b)
    ref_grads = torch.autograd.grad(ref, (v, w, b), grad.float())
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype]
    for name, got, want in zip(("values", "W", "bias"), grads, ref_grads):
        assert got.dtype == dtype, name
        assert rel_err(got, want) < TOL[dtype], name


def _by_index(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) with each row's slots in increasing latent order."""
    order = indices.argsort(-1)
    return indices.gather(-1, order), values.gather(-1, order)


def check_encode(backend: str, shape, dtype, k_aux: int, device="cpu") -> None:
    batch, d, n, k = shape
    g = torch.Generator().manual_seed(1)
    x, w_enc, b_enc, b_dec = (torch.randn(*s, generator=g).to(device, dtype).requires_grad_()
                              for s in [(batch, d), (d, n), (n,), (d,)])
    dead = (torch.rand(n, generator=g) < 0.5).to(device)
    k_aux = min(k_aux, int(dead.sum()))
    # A loss that weighs every (token, latent) pair differently, so it is independent of the
    # order of the k slots (implementation-defined: torch.topk's, grouped_topk's, Triton's).
    wv, wa = (torch.randn(batch, n, generator=g).to(device) for _ in range(2))

    def loss(code):
        out = (code[0].float() * wv.gather(1, code[1])).sum()
        return out + (code[2].float() * wa.gather(1, code[3])).sum() if k_aux else out

    with use_backend(backend):
        code = topk_encode(x, w_enc, b_enc, b_dec, k, dead=dead, k_aux=k_aux)
        grads = torch.autograd.grad(loss(code), (x, w_enc, b_enc, b_dec))
    ref = topk_encode_reference(x, w_enc, b_enc, b_dec, k, dead, k_aux)
    ref_grads = torch.autograd.grad(loss(ref), (x, w_enc, b_enc, b_dec))
    got_i, got_v = _by_index(code.indices, code.values)
    want_i, want_v = _by_index(ref[1], ref[0])
    assert torch.equal(got_i, want_i) and rel_err(got_v, want_v) < TOL[dtype]
    if k_aux:
        assert torch.equal(_by_index(code.aux_indices, code.aux_values)[0],
                           _by_index(ref[3], ref[2])[0])
        assert bool(dead[code.aux_indices].all())
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert rel_err(got, want) < TOL[dtype], name


# ---- Triton kernels, in the interpreter (subprocess) ------------------------------------------
def test_triton_kernels_pass_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "DSAE_INTERP_CHILD": "1"}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-k", "test_interp_",
                          "-p", "no:cacheprovider"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]
    print(f"interpreter tests: {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_interp_decode_forward_and_gradients(shape, dtype):
    check_decode("triton", shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,k_aux", [(SHAPES[0], 7), (SHAPES[1], 0), (SHAPES[2], 3)])
def test_interp_encode_gradients(shape, k_aux, dtype):
    check_encode("triton", shape, dtype, k_aux)


@pytest.mark.parametrize("segment,tiles", [
    ("rows", dict(LATENTS=3, BLOCK_D=16, BLOCK_P=4)), ("rows", dict(LATENTS=8, BLOCK_D=32, BLOCK_P=2)),
    ("tile", dict(BLOCK_L=4, BLOCK_D=16)), ("tile", dict(BLOCK_L=32, BLOCK_D=32))])
def test_interp_other_tile_sizes(segment, tiles, monkeypatch):
    """The tile sizes and segment kernels a GPU sweep may pick (scripts/bench_kernels.py --gpu)
    compute the same sums: several latents per program (n = 100, 33, 200 not multiples of 3, 4 or
    8), d over several column tiles, latents with more pairs than a step takes."""
    from distributed_sae.kernels import triton_sparse

    small = {"decode": dict(BLOCK_B=8, BLOCK_D=tiles["BLOCK_D"], num_warps=4),
             "gather_dot": dict(BLOCK_R=16, BLOCK_D=tiles["BLOCK_D"], num_warps=4),
             "segment_rows": dict(LATENTS=1, BLOCK_P=8, BLOCK_D=64, num_warps=4),
             "segment_tile": dict(BLOCK_L=8, BLOCK_D=64, num_warps=4)}
    small["segment_" + segment] = dict(tiles, num_warps=4)
    monkeypatch.setattr(triton_sparse, "INTERPRET_CONFIG", small)
    monkeypatch.setattr(triton_sparse, "SEGMENT_KERNEL", segment)
    for shape in SHAPES:
        check_decode("triton", shape, torch.float32)
        check_encode("triton", shape, torch.float32, k_aux=3)
    assert not triton_sparse._TILE_FAILED  # ran the kernel asked for, not the fallback


def test_interp_topk_sae_loss_matches_dense():
    check_training_steps("triton", steps=2)


# ---- the pure-torch sparse path ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_path_decode_matches_reference(shape, dtype):
    check_decode("torch", shape, dtype)


# (33, 20, 320, 6): n a multiple of 8 with 40 >= 4k groups, so kernels.select.grouped_topk runs.
@pytest.mark.parametrize("shape,k_aux", [(SHAPES[0], 7), (SHAPES[1], 0), (SHAPES[2], 3),
                                         ((33, 20, 320, 6), 5)])
def test_torch_path_encode_matches_reference(shape, k_aux):
    check_encode("torch", shape, torch.float32, k_aux)


def test_gather_dot_fallback_and_segment_sums_match():
    v, idx, w, _, grad = _decode_inputs(SHAPES[0], torch.float32)
    want = (w[idx] * grad[:, None, :]).sum(-1)  # (batch, k)
    assert rel_err(torch_sparse.gather_dot(grad, w, idx), want) < 1e-5
    assert rel_err(torch_sparse._gather_dot_chunked(grad, w.detach(), idx), want) < 1e-5
    rows, sums = torch_sparse.segment_rows(idx, v.detach(), grad, w.shape[0], with_sums=True)
    want_sums = torch.zeros(w.shape[0]).index_add_(0, idx.flatten(), v.detach().flatten())
    assert torch.allclose(sums, want_sums, atol=1e-6)
    dense = torch.zeros(idx.shape[0], w.shape[0]).scatter_add_(1, idx, v.detach())
    assert rel_err(rows, dense.t() @ grad) < 1e-5


@pytest.mark.parametrize("batch,n,k", [(37, 1000, 5), (64, 4096, 32), (9, 96, 1), (5, 100, 3),
                                       (4, 64, 8)])
def test_grouped_topk_gives_torch_topk_values(batch, n, k):
    """Exact whatever the data: random rows, rows of few distinct values (ties everywhere),
    -inf entries, a constant row; (5, 100, 3) and (4, 64, 8) take the fallback (n % 8 != 0,
    fewer than 4k groups)."""
    g = torch.Generator().manual_seed(n + k)
    for pre in (torch.randn(batch, n, generator=g),
                torch.randint(0, 4, (batch, n), generator=g).float(),
                torch.randn(batch, n, generator=g).masked_fill(torch.rand(batch, n) < 0.5,
                                                               float("-inf")),
                torch.full((batch, n), 0.25)):
        values, indices = select.grouped_topk(pre, k)
        want = pre.topk(k, dim=-1).values  # sorted, descending
        assert torch.equal(values.sort(-1, descending=True).values, want)
        assert torch.equal(pre.gather(1, indices), values)
        assert all(len(set(row.tolist())) == k for row in indices)  # k distinct latents


def test_preact_buffer_is_reused_per_thread_and_dtype():
    like = torch.zeros(1)
    a = select.preact_buffer(8, 100, like)
    assert a.shape == (8, 100) and select.preact_buffer(4, 50, like).data_ptr() == a.data_ptr()
    big = select.preact_buffer(16, 100, like)  # grows
    assert big.shape == (16, 100) and select.preact_buffer(8, 100, like).data_ptr() == big.data_ptr()
    half = select.preact_buffer(8, 100, like.half())
    assert half.dtype == torch.float16 and half.data_ptr() != big.data_ptr()
    assert select.preact_buffer(8, 100, torch.zeros(1, device="meta")) is None  # off the CPU
    select.release_buffers()
    assert select._local.buffers == {}  # freed


def test_segment_rows_transposed_is_the_same_sums():
    """The blocked (d, n) path (blocks of 512 latents) equals the (n, d) one transposed, bit for
    bit, with n spanning three blocks, empty latents and repeated indices."""
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 1100, (300, 7), generator=g)
    idx[:, 1] = idx[:, 0]  # repeated within a token
    scales, src = torch.randn(300, 7, generator=g), torch.randn(300, 33, generator=g)
    rows, sums = torch_sparse.segment_rows(idx, scales, src, 1100, with_sums=True)
    rows_t, sums_t = torch_sparse.segment_rows(idx, scales, src, 1100, with_sums=True,
                                               transposed=True)
    assert rows_t.shape == (33, 1100) and rows_t.is_contiguous()
    assert torch.equal(rows_t, rows.t()) and torch.equal(sums_t, sums)
    assert (rows[torch.bincount(idx.flatten(), minlength=1100) == 0] == 0).all()
    for transposed in (False, True):  # half inputs are summed in fp32, returned in their dtype
        half, _ = torch_sparse.segment_rows(idx, scales, src.half(), 1100, transposed=transposed)
        assert half.dtype == torch.float16


def test_torch_path_is_deterministic_and_never_saves_batch_by_n():
    from distributed_sae.sae import TopKSAE

    x = torch.randn(96, 24, generator=torch.Generator().manual_seed(3))
    dead = torch.arange(128) % 4 == 0
    grads = []
    for _ in range(2):
        sae = TopKSAE(24, 128, k=6, seed=2)
        with use_backend("torch"):
            out = sae.loss(x, dead=dead)
            saved = [*out.x_hat.grad_fn.saved_tensors,  # the decoder's and the encoder's
                     *out.x_hat.grad_fn.next_functions[0][0].saved_tensors]
            assert len(saved) == 9 and all(t.shape != (96, 128) for t in saved)
            out.loss.backward()
        grads.append([p.grad.clone() for p in sae.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # bit-identical (resume tests need it)


# ---- a TopK training step: sparse vs dense -----------------------------------------------------
def check_training_steps(backend: str, steps: int = 4) -> None:
    """A few Adam steps of a TopK SAE (AuxK active) end at the dense path's weights."""
    from distributed_sae.sae import TopKSAE

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(48, 40, generator=g) for _ in range(steps)]
    dead = torch.arange(150) % 3 == 0
    weights = {}
    for name in (backend, "dense"):
        sae = TopKSAE(40, 150, k=4, seed=5)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        with use_backend(name):
            for x in xs:
                opt.zero_grad(set_to_none=True)
                out = sae.loss(x, dead=dead)
                out.loss.backward()
                sae.remove_parallel_grad()
                opt.step()
                sae.normalize_decoder()
        assert "auxk" in out.terms
        weights[name] = {n: p.detach().clone() for n, p in sae.named_parameters()}
    for n, p in weights["dense"].items():
        # Adam's update is scale-free, so fp32 reordering errors (1e-7 relative in the grads)
        # move weights by ~1e-7 of lr per step; 1e-5 absolute leaves ample room.
        assert torch.allclose(weights[backend][n], p, atol=1e-5, rtol=0), n


def test_topk_sae_training_step_sparse_matches_dense():
    check_training_steps("torch")


# ---- dispatch ----------------------------------------------------------------------------------
def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("DSAE_KERNELS", raising=False)
    assert requested_backend() == "auto" and backend_for(cpu) == "torch"
    monkeypatch.setenv("DSAE_KERNELS", "dense")
    assert backend_for(cpu) == "dense"
    with use_backend("torch"):  # the context manager wins over the environment
        assert backend_for(cpu) == "torch"
    monkeypatch.setenv("DSAE_KERNELS", "bogus")
    with pytest.raises(ValueError, match="DSAE_KERNELS"):
        requested_backend()
    monkeypatch.setenv("DSAE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if dispatch.triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            backend_for(cpu)


def test_package_works_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from distributed_sae.kernels import backend_for, sparse_decode, triton_available\n"
            "from distributed_sae.sae import TopKSAE\n"
            "assert not triton_available() and backend_for(torch.device('cuda')) == 'torch'\n"
            "sae = TopKSAE(8, 32, k=3); sae.loss(torch.randn(5, 8)).loss.backward()\n"
            "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_S, env={**os.environ, "DSAE_KERNELS": "auto"})
    assert run.returncode == 0, run.stderr[-3000:]


def test_topk_code_without_auxk_has_no_aux():
    x, w = torch.randn(5, 8), torch.randn(8, 20)
    code = topk_encode(x, w, torch.zeros(20), torch.zeros(8), 3)
    assert isinstance(code, TopKCode) and code.aux_values is None and code.aux_indices is None


# ---- GPU: every dtype, Triton against the reference and the torch path --------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(512, 576, 16384, 32)])
def test_gpu_triton_matches_reference(shape, dtype, monkeypatch):
    pytest.importorskip("triton")
    # torch.topk over all n, as the reference: in bf16 the k-th and (k+1)-th pre-activations tie
    # often at n 16384, and grouped_topk may then keep the other one (same values, other
    # indices, other gradients). Its own test is below.
    monkeypatch.setattr(select, "_GROUP_CUDA", 0)
    check_decode("triton", shape, dtype, device="cuda")
    check_encode("triton", shape, dtype, k_aux=min(7, shape[2] // 4), device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [16384, 131072])
def test_gpu_grouped_topk_gives_topk_values(n):
    pre = torch.randn(256, n, device="cuda", dtype=torch.bfloat16)
    values, indices = select.grouped_topk(pre, 32)  # _GROUP_CUDA-sized groups
    want = pre.topk(32, dim=-1).values
    assert torch.equal(values.sort(-1).values, want.sort(-1).values)
    assert torch.equal(pre.gather(1, indices), values)
    assert int(indices.sort(-1).values.diff(dim=-1).eq(0).sum()) == 0  # distinct latents


@gpu
@needs_cuda
def test_gpu_segment_tile_kernel_compiles_and_is_used():
    """The latent-tile kernel at the committed tiles compiles with this Triton (a fallback to the
    per-latent kernel would stay silent apart from a warning, and cost ~3x on an H100)."""
    pytest.importorskip("triton")
    from distributed_sae.kernels import triton_sparse

    idx = torch.randint(0, 3000, (300, 16), device="cuda")
    s, src = torch.rand(300, 16, device="cuda"), torch.randn(300, 200, device="cuda")
    for transposed in (False, True):
        out, sums = triton_sparse.segment_rows(idx, s, src, 3000, True, transposed)
        assert not triton_sparse._TILE_FAILED
        want = torch.zeros(3000, 200, device="cuda").index_add_(
            0, idx.reshape(-1), s.reshape(-1, 1) * src.repeat_interleave(16, 0))
        assert rel_err(out.t() if transposed else out, want) < 1e-5
        assert rel_err(sums, torch.zeros(3000, device="cuda").index_add_(
            0, idx.reshape(-1), s.reshape(-1))) < 1e-5


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_topk_sae_step_matches_dense(backend):
    pytest.importorskip("triton")
    from distributed_sae.sae import TopKSAE

    x = torch.randn(256, 64, device="cuda")
    outs = {}
    for name in (backend, "dense"):
        sae = TopKSAE(64, 512, k=8, seed=1).cuda()
        with use_backend(name):
            out = sae.loss(x, dead=torch.arange(512, device="cuda") % 2 == 0)
            out.loss.backward()
        outs[name] = [p.grad for p in sae.parameters()]
    for got, want in zip(outs[backend], outs["dense"]):
        assert rel_err(got, want) < 1e-4  # TF32 may be on for the dense matmuls


def test_bench_kernels_gpu_script_dry_run_on_cpu(tmp_path):
    """scripts/bench_kernels.py --gpu runs only where a GPU is lent; its --dry-run (CPU tensors,
    the Triton interpreter, fp32, tiny shapes) takes every line of it, so a GPU lease is not
    spent finding a bug in the script. Checks the JSON holds every op and the step for the point."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "dry.json"
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_kernels.py"),
                          "--dry-run", "--n", "100", "--d", "40", "--k", "4", "--json", str(out)],
                         capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    gpu = json.loads(out.read_text())["gpu"]
    assert set(gpu["sweep"]) == {"decode", "grad_values", "grad_rows", "topk_group"}
    point = gpu["grid"][0]
    assert (point["n"], point["d"], point["k"]) == (100, 40, 4)
    assert set(point["kernels"]) >= {"decode", "grad_values", "grad_rows", "grad_rows_T",
                                     "decoder_fwd_bwd"}
    assert point["kernels"]["decode_rel_err_vs_dense"] < 1e-5
    assert point["step"]["triton"]["ms"] > 0 and point["step"]["dense"]["ms"] > 0
