"""Reading the input matrix and writing results (Zarr over fsspec)."""

from pipeline.io.artifacts import RunOutput, check_output_free
from pipeline.io.source import InputManifest, open_matrix

__all__ = ["InputManifest", "RunOutput", "check_output_free", "open_matrix"]
