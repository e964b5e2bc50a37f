"""What a run's numbers depend on beyond its settings, recorded in every run.json as ``environment``:
library versions, the thread count in effect, torch's build (BLAS/LAPACK, oneDNN, parallel backend, CPU
instruction set), the CPU, the device and whether deterministic algorithms were on. Two runs whose settings
and environment agree give the same numbers on CPU (see :mod:`lora_analysis.training.runtime`)."""

from __future__ import annotations

import os
import platform
import socket
import sys
from functools import lru_cache

import torch

def _version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def torch_build() -> dict:
    """The parts of torch's build that change results: BLAS/LAPACK, oneDNN (MKL-DNN), the parallel
    backend and the CPU instruction set torch uses."""
    show = torch.__config__.show()
    settings = {}
    for line in show.splitlines():
        if "Build settings:" in line:
            for item in line.split("Build settings:", 1)[1].split(","):
                key, _, value = item.strip().partition("=")
                settings[key] = value
    libs = [line.strip()[2:] for line in show.splitlines()
            if line.strip().startswith("- ") and "Build settings" not in line]
    backend = next((line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
                    if line.startswith("ATen parallel backend")), None)
    get_capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return {"blas": settings.get("BLAS_INFO"), "lapack": settings.get("LAPACK_INFO"),
            "mkl": settings.get("USE_MKL"), "mkldnn": settings.get("USE_MKLDNN"),
            "mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
            "openmp": settings.get("USE_OPENMP"), "parallel_backend": backend,
            "cpu_capability": get_capability() if get_capability else None,
            "commit": settings.get("COMMIT_SHA"), "libraries": libs}


# environment variables that change which kernels run or how many threads they use
RESULT_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
                   "DNNL_MAX_CPU_ISA", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")


def environment(device: torch.device | str | None = None) -> dict:
    """What a run's numbers depend on beyond its settings: library versions, the thread count in effect,
    torch's build (BLAS, oneDNN, CPU capability), the CPU, the device and whether deterministic algorithms
    were on, and the environment variables that change kernels or threads (:data:`RESULT_ENV_VARS`).
    Recorded in every run's ``environment``.

    Measured here (mlp-digits, 30 steps, one thread): OMP_NUM_THREADS=1 or not gives the same bits;
    torch's AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``) instead of AVX-512 change the validation loss in its
    8th digit, and MKL's ``MKL_CBWR=COMPATIBLE`` the training loss in its 7th. So expect the same bits only
    from the same torch build on the same ``cpu_capability`` (and MKL code path); elsewhere the last digits
    move."""
    info = {"python": platform.python_version(), "python_implementation": platform.python_implementation(),
            "torch": torch.__version__, "numpy": _version("numpy"), "transformers": _version("transformers"),
            "safetensors": _version("safetensors"), "platform": platform.platform(), "host": socket.gethostname(),
            "machine": platform.machine(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "torch_build": torch_build(), "byteorder": sys.byteorder,
            "env_vars": {k: os.environ[k] for k in RESULT_ENV_VARS if k in os.environ}}
    if device is not None:
        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            info.update(device_name=torch.cuda.get_device_name(index), cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version(),
                        cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                        cudnn_benchmark=torch.backends.cudnn.benchmark,
                        tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return {k: v for k, v in info.items() if v is not None}
