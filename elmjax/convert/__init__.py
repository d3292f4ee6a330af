"""Weight conversion between elmjax parameters and other formats (Hugging Face, MLX)."""
