"""sdjax: Stable Diffusion in JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# sdjax's own small text-to-image model, shipped inside the package (diffusers format).
BUILTIN_MODEL = _os.path.join(_os.path.dirname(__file__), "builtin", "shapes")

from sdjax.pipeline import (  # noqa: E402
    Adapter,
    ControlNet,
    IPAdapter,
    Pipeline,
    PipelineError,
    build_pipeline,
    load_adapter,
    load_controlnet,
    load_ip_adapter,
    load_pipeline,
)
from sdjax.upscaling import Upscaler, load_upscaler  # noqa: E402

__all__ = ["BUILTIN_MODEL", "Adapter", "ControlNet", "IPAdapter", "Pipeline", "PipelineError",
           "__version__", "build_pipeline", "load_adapter", "load_controlnet", "load_ip_adapter",
           "load_pipeline", "load_upscaler", "Upscaler"]
