"""The browser app: the only part of FluxStudio that imports gradio."""
