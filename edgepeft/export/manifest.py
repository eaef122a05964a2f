"""Moved to `edgepeft.artifacts.manifest` (the torch-free on-disk contract); the old path stays."""

from edgepeft.artifacts.manifest import *  # noqa: F401,F403
from edgepeft.artifacts.manifest import (  # noqa: F401  (re-exported: the old import path)
    FORMAT,
    FORMAT_VERSION,
    GRAPH_METADATA_PREFIX,
    LEGACY_MANIFEST_FILE,
    MANIFEST_FILE,
    AdapterEntry,
    ExportIndex,
    Manifest,
    __all__,
    graph_fields,
    graph_folders,
    manifest_path,
    read_manifest,
    write_json,
    write_manifest,
)
