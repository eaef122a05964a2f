"""Old path of edgepeft.evaluation.report, kept so that existing imports keep working."""

from edgepeft.evaluation.report import *  # noqa: F403
from edgepeft.evaluation.report import __all__  # noqa: F401
