"""diffalign: align text-to-image flow models (SD3, FLUX.1, FLUX.2 through diffusers) with rewards."""

__version__ = "0.1.0"
