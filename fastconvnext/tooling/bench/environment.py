"""What a result was measured on: device, driver, library versions."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import torch


def resolve_device(name):
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False on this machine")
    return torch.device(name)


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def nvidia_driver_version():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
        return next((word for word in first.split() if word.count(".") >= 1 and word[0].isdigit()), "unknown")
    except OSError:
        return "unknown"


def load_average():
    """The 1-minute load average (runnable processes), or None where the OS does not report it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_text(load, cores=None, own_threads=0):
    """The load, and whether *other* processes compete: a load taken while the benchmark runs counts its
    own `own_threads` busy threads, which are not competition."""
    cores = cores or os.cpu_count()
    if load is None:
        return f"machine load unknown ({cores} cores)"
    busy = " — busy: other processes compete for the cores" if load - own_threads > 0.5 * cores else ""
    own = f", this run's {own_threads} thread(s) included" if own_threads else ""
    return f"machine load {load:.1f} on {cores} cores (1-min average{own}){busy}"


def describe(device):
    """A flat dict recorded with every result row."""
    device = torch.device(device)
    info = {
        "device_type": device.type,
        "device_name": cpu_model(),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": package_version("triton"),
        "transformers_version": package_version("transformers"),
        "fastconvnext_version": package_version("fastconvnext"),
        "python_version": platform.python_version(),
        "cuda_version": "",
        "driver_version": "",
        "cudnn_version": "",
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(
            device_name=torch.cuda.get_device_name(index),
            cuda_version=torch.version.cuda or "",
            driver_version=nvidia_driver_version(),
            cudnn_version=str(torch.backends.cudnn.version() or ""),
        )
    return info


def header_line(info):
    """One line that says which device the figures come from, so a CPU figure never reads as a GPU one."""
    if info["device_type"] == "cuda":
        where = (f"GPU: {info['device_name']} (CUDA {info['cuda_version']}, driver {info['driver_version']}, "
                 f"cuDNN {info['cudnn_version']})")
    else:
        where = (f"CPU: {info['cpu_model']}, {info['threads']} thread(s) (of {os.cpu_count()} cores) — CPU figures, "
                 f"not GPU ones")
    return (f"{where} | torch {info['torch_version']}, triton {info['triton_version']}, transformers "
            f"{info['transformers_version']}, fastconvnext {info['fastconvnext_version']}, "
            f"python {info['python_version']}")
