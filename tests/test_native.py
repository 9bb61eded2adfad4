"""Our int8 kernel (finetune/kernels/int8_linear.cpp through native.py): the numbers against a
float64 product, a row's result independent of its batch, clear errors for inputs it cannot
take, the cached library reused, and int8 decoding on torch's kernel where no compiler is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import native, quant

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def op():
    assert native.available(), "the int8 kernel did not build on this machine (see the log)"
    return torch.ops.finetune.int8_linear


@pytest.mark.parametrize("n, k, group", [(37, 64, 64), (100, 576, 64), (4, 16, 16), (1030, 1536, 1536)])
def test_products_match_float64_and_a_row_never_depends_on_its_batch(op, n, k, group):
    torch.manual_seed(n + k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // group) * 0.01 + 1e-4
    dequantized = (w.double().reshape(n, -1, group) * scale.double()[..., None]).reshape(n, k)
    x = torch.randn(9, k)
    got = op(x, w, scale)
    want = x.double() @ dequantized.T
    assert got.dtype == torch.float32 and got.shape == (9, n)
    # fp32 sums of k products: a few ulps of the largest partial sums.
    bound = 1e-6 * k * (x.abs().double() @ dequantized.abs().T)
    if quant.rounds_activations("int8"):
        # and x rounded to integers per group first: half a step of (group's largest |x|) / qmax
        qmax = min(32767, (2**31 - 1) // (128 * group))
        half_step = x.abs().reshape(9, -1, group).amax(-1).double() / qmax / 2
        bound += torch.einsum("mg,ngk->mn", half_step, dequantized.abs().reshape(n, -1, group))
    assert ((got.double() - want).abs() <= bound + 1e-30).all()
    for rows in (1, 2, 3, 4, 5, 8):
        for start in (0, 9 - rows):
            assert torch.equal(op(x[start : start + rows], w, scale), got[start : start + rows])


def test_every_vector_path_matches_float64_and_is_batch_invariant():
    """A machine runs the widest path it has; a fresh process capped to a narrower one
    (FINETUNE_INT8_ISA) runs the float64 and batch-invariance test above on that path. AVX2 and
    generic compute the same integer dots and fp32 sums: they give the same bits."""
    code = (
        "import hashlib, sys, pytest, torch\n"
        "rc = pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'products_match', sys.argv[1]])\n"
        "from finetune import native\n"
        "torch.manual_seed(0)\n"
        "w, x = torch.randint(-128, 128, (300, 1536), dtype=torch.int8), torch.randn(5, 1536) * 3\n"
        "out = torch.ops.finetune.int8_linear(x, w, torch.rand(300, 24) * 0.01)\n"
        "print('digest', hashlib.sha256(out.numpy().tobytes()).hexdigest())\n"
        "print('isa', native.isa())\n"
        "sys.exit(rc)\n"
    )
    digests = {}
    for cap in ("avx2", "generic"):
        env = {**os.environ, "FINETUNE_INT8_ISA": cap, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-c", code, __file__],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "4 passed" in done.stdout, done.stdout[-2000:]
        words = done.stdout.split()
        ran, digests[cap] = words[-1], words[words.index("digest") + 1]
        # The cap holds; where the CPU lacks AVX2 (another architecture), generic is all there is.
        assert ran == cap or (cap == "avx2" and ran == "generic" and not _has_avx2()), (cap, ran)
    assert digests["avx2"] == digests["generic"]


def _has_avx2() -> bool:
    info = Path("/proc/cpuinfo")
    return info.is_file() and " avx2 " in info.read_text()


def test_inputs_it_cannot_take_raise_a_clear_error(op):
    w = torch.zeros(8, 24, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="K must split into groups of a multiple of 16"):
        op(torch.zeros(1, 24), w, torch.ones(8, 1))
    with pytest.raises(RuntimeError, match="fp32 x, int8 w"):
        op(torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, 1))
    with pytest.raises(RuntimeError, match=r"fp32 scales \[N, groups\]"):
        op(torch.zeros(1, 16), torch.zeros(8, 16, dtype=torch.int8), torch.ones(7, 1))


def test_the_built_library_is_cached_and_int8_uses_it(op):
    # Loaded once a process, from the cache folder of whoever asked first.
    path = native.loaded()
    assert (
        path is not None
        and path.is_file()
        and path.name == native.library_path(os.environ.get("CXX") or "c++").name
    )
    assert quant.int8_kernel() == "finetune"
    layer = torch.nn.Linear(64, 32, bias=False)
    assert quant.quantize(torch.nn.Sequential(layer), "int8") == 1
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), op(x, layer.qweight, layer.qscales))


def test_without_a_compiler_int8_runs_on_torchs_kernel(tmp_path):
    """A fresh process with no compiler and an empty cache: one line says why, and int8 still
    decodes (torch's kernel, bf16 activations)."""
    code = (
        "import torch\n"
        "from finetune import quant\n"
        "layer = torch.nn.Linear(64, 32, bias=False)\n"
        "assert quant.quantize(torch.nn.Sequential(layer), 'int8') == 1\n"
        "x = torch.randn(2, 64)\n"
        "want = x.bfloat16().float() @ quant._dequantize('int8', layer.weight).T\n"
        "assert torch.allclose(layer(x), want, rtol=2e-2, atol=2e-2)\n"
        "print('kernel', quant.int8_kernel())\n"
    )
    env = dict(os.environ, CXX="no-such-compiler", SERVE_COMPILE_CACHE=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernel aten" in done.stdout
    assert done.stderr.count("kernels: int8 decoding uses torch's kernel (RuntimeError: no C++ compiler") == 1
    assert not list(tmp_path.iterdir())
