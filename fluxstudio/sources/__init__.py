"""Where bases and LoRAs come from: typed references, the Hugging Face Hub, resumable downloads, the demo."""
