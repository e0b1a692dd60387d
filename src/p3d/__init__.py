"""p3d: declarative, YAML-driven 3D-parallel training for Hugging Face transformers models."""

__version__ = "0.1.0"
