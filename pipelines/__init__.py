"""gentron's library: model, diffusion, data and one module per pipeline stage."""

__version__ = "0.1.0"
