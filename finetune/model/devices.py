"""Which device serving and training run on, and a clear failure instead of a silent CPU fallback.

A CUDA build of torch that sees no GPU used to fall back to the CPU quietly: in the Cog image on a
host whose driver is older than the build needs, a 7B model started training on the CPU. A GPU is
expected when torch is a CUDA build *and* this is a GPU image: the CUDA base images Cog builds on
set NVIDIA_VISIBLE_DEVICES (the NVIDIA container runtime reads it), so the local CPU set-up (a CPU
wheel, no such variable) never trips the check. Expected and missing is an error that gives the
driver, the CUDA version torch was built for and the fix; SERVE_DEVICE=cpu / TRAIN_DEVICE=cpu run
on the CPU on purpose, with a warning.

`probe()` gathers the facts; `choose()` decides from them alone, so tests feed it facts. The
request comes parsed (ServeSettings.device, TrainSettings.device); NVIDIA_VISIBLE_DEVICES, read by
`probe`, is a fact of the container rather than a setting.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..settings import DEVICES, SERVE_DEVICE_ENV, TRAIN_DEVICE_ENV, ServeSettings
from .loading import ModelError

log = logging.getLogger(__name__)

# Values of NVIDIA_VISIBLE_DEVICES that mean "no GPU here on purpose" (NVIDIA container runtime).
NO_DEVICES = {"", "void", "none"}
# The oldest driver branch each CUDA major version runs on (NVIDIA's CUDA Toolkit release notes,
# minor version compatibility: CUDA 12.x needs >= 525.60.13, CUDA 13.x needs >= 580).
MIN_DRIVER = {12: 525, 13: 580}
DRIVER_FILE = Path("/proc/driver/nvidia/version")


class DeviceError(ModelError):
    """The device asked for, or the one this image expects, cannot be used; the message says why."""


@dataclass(frozen=True)
class Role:
    env: str  # the variable that picks the device
    work: str  # for messages
    # The trainer picks the GPU by itself whenever torch sees one (modeling.pick_device), so a
    # request for the CPU can only be honoured where the server takes the device it is given.
    can_force_cpu: bool


SERVE = Role(SERVE_DEVICE_ENV, "serving", can_force_cpu=True)
TRAIN = Role(TRAIN_DEVICE_ENV, "training", can_force_cpu=False)


@dataclass(frozen=True)
class Facts:
    torch_version: str
    cuda_build: str | None  # torch.version.cuda: the CUDA version torch was built for; None on a CPU wheel
    visible_devices: str | None  # NVIDIA_VISIBLE_DEVICES, set in GPU images
    gpu_available: bool  # torch.cuda.is_available()
    driver: str | None = None  # the NVIDIA driver's version, where it can be read
    cuda_error: str | None = None  # what torch said when CUDA failed to initialize

    @property
    def gpu_image(self) -> bool:
        return self.visible_devices is not None and self.visible_devices.strip().lower() not in NO_DEVICES

    @property
    def gpu_expected(self) -> bool:
        return self.cuda_build is not None and self.gpu_image


@dataclass(frozen=True)
class Choice:
    device: str
    warning: str | None = None


def choose(role: Role, requested: str | None, facts: Facts) -> Choice:
    """The device for `role` given the request (auto, cuda or cpu) and the probed facts."""
    wanted = (requested or "auto").strip().lower()
    if wanted not in DEVICES:
        raise DeviceError(f"{role.env}={requested!r} is not a device: use one of {', '.join(DEVICES)}")
    if wanted == "cpu":
        if facts.gpu_available and not role.can_force_cpu:
            raise DeviceError(
                f"{role.env}=cpu: the trainer uses the GPU whenever torch sees one; to train on the CPU, "
                "also hide the GPU with CUDA_VISIBLE_DEVICES= (empty)"
            )
        warning = None
        if facts.gpu_expected and not facts.gpu_available:
            warning = f"{role.env}=cpu: {role.work} runs on the CPU on purpose. {_diagnosis(facts)[0]}"
        return Choice("cpu", warning)
    if facts.gpu_available:
        return Choice("cuda")
    if wanted == "cuda" or facts.gpu_expected:
        raise DeviceError(_no_gpu_message(role, wanted, facts))
    return Choice("cpu")


def _no_gpu_message(role: Role, wanted: str, facts: Facts) -> str:
    asked = (
        f"{role.env}=cuda"
        if wanted == "cuda"
        else f"this is a GPU image (NVIDIA_VISIBLE_DEVICES={facts.visible_devices})"
    )
    if facts.cuda_build is None:
        return (
            f"{role.work} cannot use a GPU: {asked}, but torch {facts.torch_version} is a CPU build. "
            f"Install a CUDA build of torch, or set {role.env}=cpu"
        )
    found, fix = _diagnosis(facts)
    return (
        f"{role.work} expects a GPU: {asked}, and torch {facts.torch_version} is built for CUDA "
        f"{facts.cuda_build}, but torch sees no usable GPU. {found} {fix} To run on the CPU on purpose "
        f"(slow for anything larger than the 135M default), set {role.env}=cpu."
    )


def _diagnosis(facts: Facts) -> tuple[str, str]:
    """What was found about the driver (with torch's own words), and what to do about it."""
    least = _min_driver(facts.cuda_build)
    needs = f"NVIDIA driver R{least} or newer" if least else f"a driver for CUDA {facts.cuda_build}"
    said = f" torch said: {facts.cuda_error.rstrip('.')}." if facts.cuda_error else ""
    if facts.driver is None:
        found = "No NVIDIA driver is visible here."
        fix = f"Start the container with its GPUs (docker run --gpus all) on a host with {needs}."
    elif least and _major(facts.driver) < least:
        found = f"The NVIDIA driver is {facts.driver}; CUDA {facts.cuda_build} builds need R{least} or newer."
        fix = (
            f"Run it on a host with {needs}, or rebuild the image for this driver (cog.yaml's cuda and "
            "its torch build; see the comment there)."
        )
    else:
        found = f"The NVIDIA driver is {facts.driver}."
        fix = "Check that the GPUs reach the container (nvidia-smi inside it lists them)."
    return found + said, fix


def _min_driver(cuda_build: str | None) -> int | None:
    return MIN_DRIVER.get(_major(cuda_build)) if cuda_build else None


def _major(version: str) -> int:
    match = re.match(r"\d+", version)
    return int(match.group()) if match else 0


# -- probing ----------------------------------------------------------------------------------------
def probe() -> Facts:
    cuda_build = torch.version.cuda
    available = cuda_build is not None and torch.cuda.is_available()
    driver = error = None
    if cuda_build is not None and not available:  # only the failure needs the why
        driver, error = read_driver_version(), _cuda_init_error()
    return Facts(
        torch_version=torch.__version__,
        cuda_build=cuda_build,
        visible_devices=os.environ.get("NVIDIA_VISIBLE_DEVICES"),
        gpu_available=available,
        driver=driver,
        cuda_error=error,
    )


def read_driver_version(path: Path = DRIVER_FILE) -> str | None:
    """The NVIDIA kernel module's version (e.g. 580.65.06), from /proc, else from nvidia-smi."""
    try:
        text = path.read_text()
    except OSError:
        text = ""
    match = re.search(r"Kernel Module.*?\s(\d{3}\.\d+(?:\.\d+)?)\s", text)
    if match:
        return match.group(1)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return first[0].strip() if out.returncode == 0 and first else None


def _cuda_init_error() -> str | None:
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError or AssertionError, with the driver's reason
        return " ".join(str(exc).split())[:400] or type(exc).__name__
    return None


# -- the entry points' calls -------------------------------------------------------------------------
def resolve(
    role: Role, requested: str, warn: Callable[[str], None] = log.warning, facts: Facts | None = None
) -> str:
    """The device for `role` given its parsed setting (auto, cuda or cpu); raises DeviceError
    instead of falling back to the CPU where a GPU is expected. `facts`: probed here unless given."""
    choice = choose(role, requested, facts or probe())
    if choice.warning:
        warn(choice.warning)
    return choice.device


def serve_device(settings: ServeSettings | None = None) -> str:
    """The server's device from its settings' SERVE_DEVICE (None: parsed from the environment)."""
    return resolve(SERVE, (settings or ServeSettings.from_env()).device)


def train_device(requested: str, warn: Callable[[str], None] = log.warning) -> str:
    """The training's device from TrainSettings.device (TRAIN_DEVICE)."""
    return resolve(TRAIN, requested, warn)
