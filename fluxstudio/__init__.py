"""FluxStudio: fuse LoRAs into FLUX models at full precision, then quantize and save."""

__version__ = "0.1.0"
