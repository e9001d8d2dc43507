"""bitsandbytes (0.50) on CPUs with AVX512-BF16 asks the Hugging Face Hub for a compiled kernel when it is imported
(peft and diffusers import it): a request that carries the user's token, for code nobody asked for. Its own CPU code
does what FluxStudio needs, so while bitsandbytes imports, the `kernels` package is hidden from it and it keeps that.
Installed when `fluxstudio` is imported; it costs nothing until bitsandbytes is imported."""

from __future__ import annotations

import importlib.abc
import logging
import sys


class _WithoutKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        for finder in sys.meta_path:  # the ordinary finders find it; its loader then runs without `kernels`
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module = _hiding_kernels(spec.loader.exec_module)  # type: ignore[method-assign]
                return spec
        return None


def _hiding_kernels(exec_module):
    def run(module) -> None:
        saved = sys.modules.get("kernels")
        sys.modules["kernels"] = None  # type: ignore[assignment] - `from kernels import ...` raises ImportError
        said = logging.getLogger("bitsandbytes.backends.cpu.ops")  # which would say "pip install kernels"
        level = said.level
        said.setLevel(logging.ERROR)
        try:
            exec_module(module)
        finally:
            said.setLevel(level)
            if saved is None:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = saved

    return run


def install() -> None:
    if not any(isinstance(f, _WithoutKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, _WithoutKernels())
