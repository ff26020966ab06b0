"""ComfyUI-free core: alpha toolkit, metrics, keyers, matting solvers, models, training and CLI."""
