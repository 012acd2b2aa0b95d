"""alignkit: recipe-driven fine-tuning and alignment of open LLMs on the Hugging Face stack."""

__version__ = "0.1.0"
