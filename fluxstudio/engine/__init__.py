"""The streaming engine: safetensors reading and writing, models, LoRAs, the fuse, the retention score."""
