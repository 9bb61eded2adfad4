"""Our kernels (finetune/engine/kernels/ through kernel.py): the int8 product's and decode attention's
numbers against float64, a row's result independent of its batch (and of its padding), clear errors for inputs it cannot
take, the cached library reused, and int8 decoding on torch's kernel where no compiler is. The
compile cache as a trust boundary: only a folder private to this user is used, and only files whose
SHA-256 was recorded when they were built are loaded; a planted library is rebuilt, never loaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from finetune.engine import kernel, quant

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def op():
    assert kernel.available(), "the int8 kernel did not build on this machine (see the log)"
    return torch.ops.finetune.int8_linear


@pytest.mark.parametrize(
    "n, k, group", [(37, 64, 64), (100, 576, 64), (4, 16, 16), (20, 96, 48), (1030, 1536, 1536)]
)
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
        # and x rounded to int8 per group first: half a step of (group's largest |x|) / 127
        half_step = x.abs().reshape(9, -1, group).amax(-1).double() / 127 / 2
        bound += torch.einsum("mg,ngk->mn", half_step, dequantized.abs().reshape(n, -1, group))
    assert ((got.double() - want).abs() <= bound + 1e-30).all()
    for rows in (1, 2, 3, 4, 5, 8):
        for start in (0, 9 - rows):
            assert torch.equal(op(x[start : start + rows], w, scale), got[start : start + rows])


def int4_weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight's int4 copy in our layout (quant._pack_int4) and the weights it stands for."""
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    w[0, :32] += 1.0  # a group far from zero: the offset carries it
    q, scales = quant._quantize_int4(w)
    return q, scales, quant._dequantize("int4", w).double()


@pytest.mark.parametrize("n, k", [(8, 32), (40, 64), (104, 576), (1032, 1536)])
def test_int4_products_match_float64_and_a_row_never_depends_on_its_batch(op, n, k):
    q, scales, dequantized = int4_weights(n, k, n + k)
    assert q.shape == (n // 8, k * 4) and scales.shape == (n // 8, k // 2)
    x = torch.randn(9, k)
    got = torch.ops.finetune.int4_linear(x, q, scales)
    assert got.dtype == torch.float32 and got.shape == (9, n)
    want = x.double() @ dequantized.T
    # x rounded to int8 per group of 32 (half a step of the group's largest |x| / 127), plus fp32 sums
    half_step = x.abs().reshape(9, -1, 32).amax(-1).double() / 127 / 2
    bound = torch.einsum("mg,ngk->mn", half_step, dequantized.abs().reshape(n, -1, 32))
    bound += 1e-6 * k * (x.abs().double() @ dequantized.abs().T)
    assert ((got.double() - want).abs() <= bound).all()
    for rows in (1, 2, 3, 5, 8):
        for start in (0, 9 - rows):
            assert torch.equal(
                torch.ops.finetune.int4_linear(x[start : start + rows], q, scales), got[start : start + rows]
            )


def test_int4_prompts_rows_give_their_decode_bits(op):
    """As int8's below: a prompt's rows, in blocks of 170 rows of 1536-wide int8 activations."""
    q, scales, _ = int4_weights(72, 1536, 5)
    x = torch.randn(300, 1536)
    x[5, 70] = float("inf")  # its group's outputs are NaN, and its row's only
    whole = torch.ops.finetune.int4_linear(x, q, scales)
    assert whole[5].isnan().all() and not whole[torch.arange(300) != 5].isnan().any()
    whole = whole.nan_to_num(nan=7.0)
    for start, rows in ((0, 1), (169, 2), (100, 130), (299, 1), (7, 293)):
        part = torch.ops.finetune.int4_linear(x[start : start + rows], q, scales).nan_to_num(nan=7.0)
        assert torch.equal(part, whole[start : start + rows])


def test_int4_refuses_what_it_cannot_take(op):
    int4 = torch.ops.finetune.int4_linear
    q, scales = torch.zeros(2, 256, dtype=torch.uint8), torch.zeros(2, 32, dtype=torch.bfloat16)  # K = 64
    assert int4(torch.zeros(1, 64), q, scales).shape == (1, 16)
    with pytest.raises(RuntimeError, match="K must be a multiple of 32"):
        int4(torch.zeros(1, 48), q, scales)
    with pytest.raises(RuntimeError, match=r"packed uint8 w \[N / 8, K \* 4\]"):
        int4(torch.zeros(1, 32), q, scales)
    with pytest.raises(RuntimeError, match=r"bf16 scales \[N / 8, K / 2\]"):
        int4(torch.zeros(1, 64), q, scales.float())
    with pytest.raises(RuntimeError, match="fp32 x"):
        int4(torch.zeros(1, 64, dtype=torch.bfloat16), q, scales)


def _sdpa64(q, past_k, past_v, k, v, mask, scale):
    """The attention decode_attention computes, in float64 through SDPA (grouped heads expanded)."""
    keys = torch.cat([past_k, k[None]]).permute(1, 2, 0, 3).double()
    values = torch.cat([past_v, v[None]]).permute(1, 2, 0, 3).double()
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].double(), keys, values, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.reshape(q.shape[0], -1)


# 64 and 80 wide: the vector path's values in registers 8 vectors at a time, then 2; 12 wide: plain
# C++. Lengths put a row's positions at, below and past blocks of 8 (the vector path's scores).
@pytest.mark.parametrize(
    "heads, kv_heads, dim, length",
    [(9, 3, 64, 23), (4, 4, 16, 1), (6, 2, 12, 40), (8, 2, 80, 16), (4, 1, 128, 70)],
)
def test_decode_attention_matches_float64_and_a_row_never_depends_on_its_padding(
    heads, kv_heads, dim, length
):
    """One new token per row over a left-padded, time-major cache: SDPA's numbers, and each row's
    bits the same as decoding it alone over its own columns (dim 12 takes the plain C++ path)."""
    assert kernel.available()
    op = torch.ops.finetune.decode_attention
    torch.manual_seed(heads + length)
    rows = 5
    q = torch.randn(rows, heads, dim)
    past_k, past_v = torch.randn(2, length, rows, kv_heads, dim)
    k, v = torch.randn(2, rows, kv_heads, dim)
    pads = [0, 1, length // 2, length - 1, length]  # the last row has only its new token
    mask = torch.tensor([[c >= p for c in range(length + 1)] for p in pads])
    got = op(q, past_k, past_v, k, v, mask, 0.125)
    assert got.shape == (rows, heads * dim) and got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), _sdpa64(q, past_k, past_v, k, v, mask, 0.125), rtol=1e-5, atol=1e-6
    )
    for r, p in enumerate(pads):
        own = (past_k[p:, r : r + 1].contiguous(), past_v[p:, r : r + 1].contiguous())
        alone = op(q[r : r + 1], *own, k[r : r + 1], v[r : r + 1], mask[r : r + 1, p:], 0.125)
        assert torch.equal(alone, got[r : r + 1]), r
    # Garbage in the padding (a reused buffer) changes nothing.
    dirty = past_k.clone()
    dirty[0, [r for r, p in enumerate(pads) if p]] = float("nan")
    assert torch.equal(op(q, dirty, past_v, k, v, mask, 0.125), got)


def test_decode_attention_refuses_what_it_cannot_take():
    op = torch.ops.finetune.decode_attention
    q, past, new = torch.zeros(2, 4, 8), torch.zeros(3, 2, 2, 8), torch.zeros(2, 2, 8)
    ok = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"mask \[rows, length \+ 1\] of bools"):
        op(q, past, past, new, new, torch.ones(2, 3, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="heads must be a multiple of kv heads"):
        op(torch.zeros(2, 3, 8), past, past, new, new, ok, 1.0)
    with pytest.raises(RuntimeError, match="fp32 q, keys and values"):
        op(q.double(), past, past, new, new, ok, 1.0)
    with pytest.raises(RuntimeError, match="shapes of q, keys and values disagree"):
        op(q, past, past[:, :1], new, new, ok, 1.0)


def test_a_prompts_rows_give_their_decode_bits(op):
    """Prompts go through the same kernel as decoding, in blocks of rows: a row's result is the same
    at any place in a prompt of any length (block edges included) as alone, so a prompt's cache does
    not depend on how it was chunked."""
    torch.manual_seed(3)
    # 1536 wide: blocks of 170 rows of int8 x, 42 of fp32 x (rows_per_pass), edges within 300 rows.
    # Rows of w 4 at a time (70: a short block of 2 last), rows of x 2 at a time and one last: every
    # way must give the same bits. (quant packs int8 in lanes off AVX-512: test_int8_in_lanes_...)
    w = torch.randint(-127, 128, (70, 1536), dtype=torch.int8)
    scale = torch.rand(70, 24) * 0.01
    x = torch.randn(300, 1536)
    x[5, 70] = float("nan")  # its group's outputs are NaN, and its row's only
    whole = op(x, w, scale)
    assert whole[5].isnan().all() and not whole[torch.arange(300) != 5].isnan().any()
    whole = whole.nan_to_num(nan=7.0)
    for start, rows in ((0, 1), (41, 2), (169, 2), (100, 130), (299, 1), (0, 171), (7, 293)):
        assert torch.equal(
            op(x[start : start + rows], w, scale).nan_to_num(nan=7.0), whole[start : start + rows]
        )


def test_every_vector_path_matches_float64_and_is_batch_invariant():
    """A machine runs the widest path it has; a fresh process capped to a narrower one
    (FINETUNE_INT8_ISA) runs the float64 and batch-invariance tests above (int8, int8 in lanes and
    int4 products, and decode attention) on that path. For int8 and int4, AVX2 and generic compute
    the same integer dots and fp32 sums: they give the same bits."""
    code = (
        "import hashlib, sys, pytest, torch\n"
        "rc = pytest.main(['-q', '-p', 'no:cacheprovider', '-k', '(float64 or prompts_rows or in_lanes) and not every_vector', sys.argv[1]])\n"
        "from finetune.engine import kernel\n"
        "torch.manual_seed(0)\n"
        "w, x = torch.randint(-128, 128, (300, 1536), dtype=torch.int8), torch.randn(133, 1536) * 3\n"
        "out = torch.ops.finetune.int8_linear(x, w, torch.rand(300, 24) * 0.01)\n"
        "from finetune.engine import quant\n"
        "out = torch.cat([out, torch.ops.finetune.int4_linear(x, *quant._quantize_int4(torch.randn(304, 1536)))], 1)\n"
        "lanes = quant._pack_int8_lanes(w[:296], torch.rand(296, 24) * 0.01)\n"
        "out = torch.cat([out, torch.ops.finetune.int8_lanes_linear(x, *lanes)], 1)\n"
        "print('digest', hashlib.sha256(out.numpy().tobytes()).hexdigest())\n"
        "print('isa', kernel.isa())\n"
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
        assert "22 passed" in done.stdout, done.stdout[-2000:]
        words = done.stdout.split()
        ran, digests[cap] = words[-1], words[words.index("digest") + 1]
        # The cap holds; where the CPU lacks AVX2 (another architecture), generic is all there is.
        assert ran == cap or (cap == "avx2" and ran == "generic" and not _has_avx2()), (cap, ran)
    assert digests["avx2"] == digests["generic"]


def _has_avx2() -> bool:
    info = Path("/proc/cpuinfo")
    return info.is_file() and " avx2 " in info.read_text()


@pytest.mark.parametrize("n, k, group", [(8, 16, 16), (40, 96, 32), (104, 576, 64), (72, 1536, 64)])
def test_int8_in_lanes_gives_the_plain_layouts_bits_at_every_row_count(op, n, k, group):
    """int8 copies packed at quantize time in the kernel's lane order (int8_lanes_linear, quant's
    copies off AVX-512): the same integer dots and fp32 sums as int8_linear's integer path, so the
    same bits at 1 to 300 rows (8, 4, 2 and 1 row of x at a time meet each block of 8 rows of w),
    and a row's bits at any place among them. The packing unpacks to the same numbers."""
    torch.manual_seed(n + k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // group) * 0.01 + 1e-4
    lanes = quant._pack_int8_lanes(w, scale)
    assert lanes[0].shape == (n // 8, k // 4, 32) and lanes[1].shape == (n // 8, k // group, 8)
    unpacked = lanes[0].reshape(n // 8, k // 4, 8, 4).permute(0, 2, 1, 3).reshape(n, k)
    assert torch.equal(unpacked, w) and torch.equal(lanes[1].permute(0, 2, 1).reshape(n, -1), scale)
    # Row j of block b, weights 4c..4c+3: bytes 4j..4j+3 of lanes[0][b, c].
    b = n // 8 - 1
    assert torch.equal(lanes[0][b, 2, 12:16], w[8 * b + 3, 8:12])
    lanes_op = torch.ops.finetune.int8_lanes_linear
    x = torch.randn(300, k) * 2
    x[7, 3] = float("nan")
    whole = lanes_op(x, *lanes)
    assert whole.shape == (300, n) and whole[7].isnan().all() and whole.isnan().sum() == n
    if quant.rounds_activations("int8"):  # int8_linear's integer path: the same bits
        assert torch.equal(op(x, w, scale).nan_to_num(nan=7.0), whole.nan_to_num(nan=7.0))
    else:  # AVX-512's int8_linear multiplies fp32 x; lanes round it to int8: within half a step
        deq = (w.double().reshape(n, -1, group) * scale.double()[..., None]).reshape(n, k)
        half_step = x[:7].abs().reshape(7, -1, group).amax(-1).double() / 127 / 2
        bound = torch.einsum("mg,ngk->mn", half_step, deq.abs().reshape(n, -1, group))
        bound += 1e-6 * k * (x[:7].abs().double() @ deq.abs().T)
        assert ((whole[:7].double() - x[:7].double() @ deq.T).abs() <= bound).all()
    whole = whole.nan_to_num(nan=7.0)
    for start, rows in ((0, 1), (5, 2), (9, 3), (0, 4), (100, 7), (0, 8), (3, 13), (299, 1), (44, 256)):
        got = lanes_op(x[start : start + rows], *lanes).nan_to_num(nan=7.0)
        assert torch.equal(got, whole[start : start + rows]), (start, rows)


def test_quantize_packs_int8_in_lanes_off_avx512_and_multiplies_the_same(tiny_linear_model):
    """quant's int8 copies: in lanes where int8_lanes() (our kernel, not AVX-512), whole blocks of 8
    rows only; fused groups keep whole blocks, and every layer multiplies to its dequantized weight."""
    model = tiny_linear_model
    assert quant.quantize(model, "int8") == 3
    for layer in model:
        q, scales = layer.q_base
        lanes = quant.int8_lanes() and layer.out_features % 8 == 0
        assert q.dim() == (3 if lanes else 2), layer
        x = torch.randn(5, layer.in_features)
        want = x.double() @ quant._dequantize("int8", layer.weight).double().T
        torch.testing.assert_close(layer(x).double(), want, rtol=0.02, atol=0.02 * want.abs().max().item())
    fused = quant.fuse_low_bit("int8", [layer.q_base for layer in model])
    mixed = quant.int8_lanes()  # the 12-row layer stays [out, in] beside the lanes of the others
    assert len(fused) == (3 if mixed else 1)
    x = torch.randn(3, 64)
    parts = torch.cat([quant._matmul("int8", x, *copy) for copy in fused], dim=1)
    assert torch.equal(parts, torch.cat([layer(x) for layer in model], dim=1))


@pytest.fixture
def tiny_linear_model():
    torch.manual_seed(0)
    return torch.nn.ModuleList([torch.nn.Linear(64, n, bias=False) for n in (16, 12, 40)])


def test_int8_in_lanes_refuses_what_it_cannot_take():
    lanes_op = torch.ops.finetune.int8_lanes_linear
    w, s = torch.zeros(2, 4, 32, dtype=torch.int8), torch.ones(2, 1, 8)  # K = 16, N = 16
    assert lanes_op(torch.zeros(3, 16), w, s).shape == (3, 16)
    with pytest.raises(RuntimeError, match=r"packed int8 w \[N / 8, K / 4, 32\]"):
        lanes_op(torch.zeros(1, 32), w, s)
    with pytest.raises(RuntimeError, match=r"fp32 scales \[N / 8, groups, 8\]"):
        lanes_op(torch.zeros(1, 16), w, torch.ones(2, 1, 4))
    with pytest.raises(RuntimeError, match="groups of a multiple of 16"):
        lanes_op(torch.zeros(1, 16), w, torch.ones(2, 2, 8))
    with pytest.raises(RuntimeError, match="fp32 x"):
        lanes_op(torch.zeros(1, 16, dtype=torch.bfloat16), w, s)


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
    path = kernel.loaded()
    assert (
        path is not None
        and path.is_file()
        and path.name == kernel.library_path(os.environ.get("CXX") or "c++").name
    )
    assert quant.int8_kernel() == "finetune"
    layer = torch.nn.Linear(64, 32, bias=False)
    assert quant.quantize(torch.nn.Sequential(layer), "int8") == 1
    x = torch.randn(3, 64)
    lanes = layer.qweight.dim() == 3  # packed in lanes off AVX-512
    assert lanes == quant.int8_lanes() == (kernel.isa() != "avx512")
    product = torch.ops.finetune.int8_lanes_linear if lanes else op
    assert torch.equal(layer(x), product(x, layer.qweight, layer.qscales))


def test_without_a_compiler_int8_runs_on_torchs_kernel(tmp_path):
    """A fresh process with no compiler and an empty cache: one line says why, and int8 still
    decodes (torch's kernel, bf16 activations)."""
    code = (
        "import torch\n"
        "from finetune.engine import quant\n"
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


# -- the cache folder as a trust boundary --------------------------------------------------------


def planted_library(folder: Path, marker: Path) -> Path:
    """A real shared object that creates `marker` when it is loaded: what someone could plant in a
    compile cache for a server to run."""
    source = folder / "planted.cpp"
    source.write_text(
        "#include <cstdio>\n"
        "__attribute__((constructor)) static void planted() {\n"
        f'  if (std::FILE* f = std::fopen({json.dumps(str(marker))}, "w")) std::fclose(f);\n'
        "}\n"
    )
    library = folder / "planted.so"
    compiler = os.environ.get("CXX") or "c++"
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True, timeout=120)
    return library


def publish_bytes(data: bytes, path: Path) -> None:
    """Record `data` as this user's build of `path`, as a real build does (kernel.publish)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        (Path(tmp) / path.name).write_bytes(data)
        kernel.publish(Path(tmp) / path.name, path)


@pytest.fixture
def fresh(monkeypatch):
    """No fallback folders from other tests: each case warns anew."""
    monkeypatch.setattr(kernel, "_fallbacks", {})


def _theirs(tmp_path: Path) -> Path:
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    try:
        os.chown(folder, os.geteuid() + 12345, -1)
    except PermissionError:  # not root: a folder of root's stands for another user's
        return Path("/")
    return folder


@pytest.mark.parametrize(
    "case, why",
    [
        ("missing", None),
        ("private", None),
        ("under a sticky folder", None),
        ("group-writable", "writable by its group or others (mode 770)"),
        ("world-writable", "writable by its group or others (mode 703)"),
        ("another user's", "is owned by uid"),
        ("a link to a private folder", "is a symbolic link"),
        ("under a writable folder", "above it, is writable by its group or others"),
        ("under a link another user owns", "above it, is a link owned by uid"),
    ],
)
def test_only_a_folder_private_to_this_user_is_used_as_the_cache(
    tmp_path, monkeypatch, capfd, fresh, case, why
):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    folder = {
        "missing": tmp_path / "made" / "for" / "it",
        "private": private,
        "under a sticky folder": tmp_path / "sticky" / "cache",
        "group-writable": tmp_path / "group",
        "world-writable": tmp_path / "world",
        "another user's": None,
        "a link to a private folder": tmp_path / "link",
        "under a writable folder": tmp_path / "shared" / "cache",
        "under a link another user owns": tmp_path / "their-link" / "cache",
    }[case] or _theirs(tmp_path)
    if case in ("group-writable", "world-writable"):
        folder.mkdir()
        folder.chmod(0o770 if case == "group-writable" else 0o703)
    elif case in ("under a sticky folder", "under a writable folder"):
        folder.parent.mkdir()
        folder.parent.chmod(0o1777 if case == "under a sticky folder" else 0o777)
    elif case == "a link to a private folder":
        folder.symlink_to(private)
    elif case == "under a link another user owns":
        folder.parent.symlink_to(private)
        try:
            os.lchown(folder.parent, os.geteuid() + 12345, -1)
        except PermissionError:
            pytest.skip("needs root to make a link another user owns")
    monkeypatch.setenv(kernel.CACHE_ENV, str(folder))
    got = kernel.cache_dir()
    err = capfd.readouterr().err
    if why is None:
        assert got == folder and err == ""
        assert stat.S_IMODE(folder.stat().st_mode) & 0o022 == 0 and kernel.untrusted(got) is None
        if case == "missing":  # each folder made for it is private
            assert [
                stat.S_IMODE(p.stat().st_mode) for p in (folder, folder.parent, folder.parent.parent)
            ] == [0o700] * 3
        return
    assert got != folder and got.name.startswith(kernel._FALLBACK_PREFIX)
    assert kernel.untrusted(got) is None and stat.S_IMODE(got.stat().st_mode) == 0o700
    assert err.count("compile cache: not using") == 1 and why in err and str(folder) in err
    assert kernel.cache_dir() == got and capfd.readouterr().err == ""  # once a process


def test_only_recorded_private_files_pass_the_check(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    library = cache / "lib.so"
    publish_bytes(b"built", library)
    package = tmp_path / "unpacked"
    (package / "data").mkdir(parents=True)
    (package / "data" / "model.so").write_bytes(b"model")
    (package / "version").write_text("1")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        shutil.copytree(package, Path(tmp) / "pkg")
        kernel.publish(Path(tmp) / "pkg", cache / "pkg")
    assert kernel.verified(library) == hashlib.sha256(b"built").hexdigest()
    assert kernel.verified(cache / "pkg") == kernel.digest(package) is not None
    assert json.loads((cache / kernel.MANIFEST).read_text())["sha256"].keys() == {"lib.so", "pkg"}
    (cache / "pkg" / "data" / "model.so").write_bytes(b"modem")  # one file's bytes changed
    assert kernel.verified(cache / "pkg") is None
    (cache / "pkg" / "data" / "model.so").write_bytes(b"model")
    (cache / "pkg" / "data" / "extra.so").write_bytes(b"")  # one file more
    assert kernel.verified(cache / "pkg") is None
    (cache / "pkg" / "data" / "extra.so").unlink()
    assert kernel.verified(cache / "pkg") is not None
    library.chmod(0o664)  # the right bytes, but others could change them before the load
    assert kernel.verified(library) is None
    library.chmod(0o644)
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(b"built")
    library.unlink()
    library.symlink_to(elsewhere)  # the right bytes behind a link
    assert kernel.verified(library) is None
    library.unlink()
    library.write_bytes(b"built")
    assert kernel.verified(library) is not None
    (cache / kernel.MANIFEST).unlink()  # nothing recorded: nothing passes
    assert kernel.verified(library) is None and kernel.verified(cache / "pkg") is None


@pytest.mark.parametrize("where", ["private", "group-writable"])
def test_a_planted_library_is_rebuilt_not_loaded(op, tmp_path, monkeypatch, where):
    """A fresh process finds a real shared object (one that leaves a marker when loaded) at the
    kernel's name in its cache: in a private cache, recorded there as another build's file; in a
    group-writable one, recorded as its own (whoever can write the folder can write the manifest).
    It loads neither: it rebuilds the kernel, in place or in a private folder of its own, and that
    computes what this process's kernel does. The build is a stand-in compiler that copies this
    process's library (building the real one takes seconds a time)."""
    genuine = kernel.loaded()
    marker = tmp_path / "loaded-the-planted-library"
    planted = planted_library(tmp_path, marker).read_bytes()
    compiler = tmp_path / "cxx"
    compiler.write_text(
        '#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && exec cp "'
        + str(genuine)
        + '" "$2"; shift; done\n'
    )
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv(kernel.CACHE_ENV, str(cache))
    path = kernel.library_path(str(compiler))
    publish_bytes(genuine.read_bytes() if where == "private" else planted, path)
    path.write_bytes(planted)
    if where == "group-writable":
        cache.chmod(0o770)
    code = (
        "import hashlib, torch\n"
        "from finetune.engine import kernel\n"
        "assert kernel.available()\n"
        "print('loaded', kernel.loaded(), hashlib.sha256(kernel.loaded().read_bytes()).hexdigest())\n"
        "torch.manual_seed(0)\n"
        "w, x = torch.randint(-128, 128, (48, 64), dtype=torch.int8), torch.randn(3, 64)\n"
        "out = torch.ops.finetune.int8_linear(x, w, torch.rand(48, 1) * 0.01)\n"
        "print('digest', hashlib.sha256(out.numpy().tobytes()).hexdigest())\n"
    )
    env = {**os.environ, "CXX": str(compiler), kernel.CACHE_ENV: str(cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not marker.exists()
    words = done.stdout.split()
    loaded, loaded_digest = Path(words[words.index("loaded") + 1]), words[words.index("loaded") + 2]
    built = hashlib.sha256(genuine.read_bytes()).hexdigest()
    assert loaded.name == path.name and loaded_digest == built
    torch.manual_seed(0)
    w, x = torch.randint(-128, 128, (48, 64), dtype=torch.int8), torch.randn(3, 64)
    out = op(x, w, torch.rand(48, 1) * 0.01)
    assert words[words.index("digest") + 1] == hashlib.sha256(out.numpy().tobytes()).hexdigest()
    if where == "private":  # rebuilt in place, and recorded
        assert loaded == path and kernel.verified(path) == built
        assert f"compile cache: {path} is not what this user built there" in done.stderr
    else:  # not even written to: built in the process's own folder, gone with it
        assert loaded.parent != cache and not loaded.parent.exists()
        assert path.read_bytes() == planted and f"compile cache: not using {cache}" in done.stderr
