"""Where a result came from: library versions and the machine, recorded beside plans, runs and benchmarks."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Iterable

__all__ = ["DEFAULT_PACKAGES", "library_versions", "machine", "package_version"]

DEFAULT_PACKAGES = ("goraplan", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors")


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed.

    >>> package_version("no-such-package-here") is None
    True
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Python's version and each package's (None when not installed).

    >>> sorted(library_versions(("goraplan",)))
    ['goraplan', 'python']
    """
    return {"python": platform.python_version(), **{name: package_version(name) for name in packages}}


def machine() -> dict[str, object]:
    """Platform, processor, CPU count and, when there is one, the first GPU's name."""
    info: dict[str, object] = {"platform": platform.platform(),
                               "processor": platform.processor() or platform.machine(),
                               "cpu_count": os.cpu_count()}
    import torch  # only here: reading versions must not load torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
