"""Old path of edgepeft.evaluation.examples, kept so that existing imports keep working."""

from edgepeft.evaluation.examples import *  # noqa: F403
from edgepeft.evaluation.examples import __all__  # noqa: F401
