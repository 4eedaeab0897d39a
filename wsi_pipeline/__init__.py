"""wsi_pipeline: whole-slide images in, slide-level diagnoses and survival predictions out."""

__version__ = "0.1.0"
