"""Old path of edgepeft.evaluation.metrics, kept so that existing imports keep working."""

from edgepeft.evaluation.metrics import *  # noqa: F403
from edgepeft.evaluation.metrics import __all__  # noqa: F401
