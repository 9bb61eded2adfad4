"""bench/gpu_check.py's parts that run without a GPU: trimming a wheel to the libraries a machine
loads. (`bash bench/gpu_check.sh --dry-run` runs the whole driver on tiny shapes on a CPU.)"""

from __future__ import annotations

import zipfile

from bench.gpu_check import trim_wheel


def test_trim_wheel_keeps_the_named_libraries_and_their_record_lines(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = [
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda128.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_rocm64.so",
    ]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in names:
            z.writestr(name, name.encode())
        record = (
            "\n".join(f"{n},sha256=x,{len(n)}" for n in names) + "\nbitsandbytes-0.50.2.dist-info/RECORD,,\n"
        )
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    trim_wheel(wheel, ["cuda130", "cpu"])
    with zipfile.ZipFile(wheel) as z:
        kept = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
        assert z.read("bitsandbytes/libbitsandbytes_cuda130.so") == b"bitsandbytes/libbitsandbytes_cuda130.so"
    assert kept == {
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes-0.50.2.dist-info/RECORD",
    }
    assert (
        "cuda128" not in record and "rocm64" not in record and "libbitsandbytes_cuda130.so,sha256" in record
    )
