"""Moved to `edgepeft.artifacts.files` (the torch-free on-disk contract); the old path stays."""

from edgepeft.artifacts.files import *  # noqa: F401,F403
from edgepeft.artifacts.files import (  # noqa: F401  (re-exported: the old import path)
    UNRECORDED,
    FileIntegrityError,
    __all__,
    check_export,
    check_files,
    file_records,
    record_files,
    sha256_file,
    split_records,
    tensors_sha256,
)
