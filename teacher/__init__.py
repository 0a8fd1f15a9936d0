"""Teachers: GGUF reading, model configs, the forward pass and its two weight backends."""
