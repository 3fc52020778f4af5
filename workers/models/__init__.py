"""Models as content-addressed files, loaded once per worker and kept resident."""

from workers.models.store import (
    LoadedModel,
    ModelCache,
    ModelManifest,
    fetch_model_files,
    get_manifest,
    load_model,
    put_model,
)
from workers.models.tiny_llama import TINY_LLAMA_NAME, ModelFiles, build_tiny_llama

__all__ = [
    "TINY_LLAMA_NAME",
    "LoadedModel",
    "ModelCache",
    "ModelFiles",
    "ModelManifest",
    "build_tiny_llama",
    "fetch_model_files",
    "get_manifest",
    "load_model",
    "put_model",
]
