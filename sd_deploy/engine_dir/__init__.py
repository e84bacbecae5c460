"""The engine-dir contract: the only thing export/build and run share.

Everything the runtime needs (model family, prediction type, scheduler defaults,
tokenizer files, I/O names, dtypes, shape ranges, TensorRT plan metadata) is in an
engine dir's manifest.json or in files it names; this package reads and writes them.
It imports nothing of sd_deploy but `errors`, so the exporter, the TensorRT builder,
the runtime and every wrapper can depend on it without depending on each other.

    layout     names and paths inside an engine dir
    manifest   manifest.json: schema, reading with one-line errors, writing
    shapes     shape ranges and optimization profiles
    plans      the metadata beside each TensorRT plan, and whether a plan is stale
    atomic     the one atomic-write helper (files and folders, umask honoured)
    hashing    sha256 of files, chunked
"""

from sd_deploy.engine_dir.layout import COMPONENTS, MANIFEST_NAME, REQUIRED_COMPONENTS
from sd_deploy.engine_dir.manifest import (
    SCHEMA_VERSION,
    ComponentSpec,
    Manifest,
    ModelInfo,
    ShapeRange,
    ShapeRanges,
    TensorSpec,
    TokenizerInfo,
    read_manifest,
)

__all__ = [
    "COMPONENTS",
    "MANIFEST_NAME",
    "REQUIRED_COMPONENTS",
    "SCHEMA_VERSION",
    "ComponentSpec",
    "Manifest",
    "ModelInfo",
    "ShapeRange",
    "ShapeRanges",
    "TensorSpec",
    "TokenizerInfo",
    "read_manifest",
]
