"""EriDiffusion: fine-tune diffusion models from one ai-toolkit-style YAML file."""
__version__ = "0.1.0"
