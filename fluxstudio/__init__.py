"""FluxStudio: fuse LoRAs into FLUX models at full precision, then quantize and save."""

from fluxstudio import offline_kernels

__version__ = "0.1.0"

offline_kernels.install()
