"""LoRA fine-tuning and serving for LLaMA-family models, packaged for Cog."""

__version__ = "0.1.0"
