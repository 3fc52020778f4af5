"""Models as content-addressed files, loaded once per worker and kept resident.

Importing this package does not import torch; loading, converting and training do."""

from flowmesh.workers.models.adapters import (
    AdapterFiles,
    adapter_digest,
    put_adapter,
    store_artifacts,
)
from flowmesh.workers.models.sources import BUILTIN_SOURCES, publish_source
from flowmesh.workers.models.store import (
    LoadedModel,
    ModelCache,
    ModelManifest,
    Task,
    fetch_model_files,
    get_manifest,
    load_model,
    put_model,
)
from flowmesh.workers.models.tiny_llama import TINY_LLAMA_NAME, ModelFiles, build_tiny_llama

__all__ = [
    "BUILTIN_SOURCES",
    "TINY_LLAMA_NAME",
    "AdapterFiles",
    "LoadedModel",
    "ModelCache",
    "ModelFiles",
    "ModelManifest",
    "Task",
    "adapter_digest",
    "build_tiny_llama",
    "fetch_model_files",
    "get_manifest",
    "load_model",
    "publish_source",
    "put_adapter",
    "put_model",
    "store_artifacts",
]
