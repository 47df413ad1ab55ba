"""lossmask: exact loss masks for supervised fine-tuning and preference tuning of causal LMs."""
__version__ = "0.1.0"
