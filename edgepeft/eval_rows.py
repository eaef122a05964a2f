"""Old path of edgepeft.evaluation.examples, kept so that existing imports keep working."""

from edgepeft.evaluation.examples import *  # noqa: F401,F403
from edgepeft.evaluation.examples import EvalExample, read_examples  # noqa: F401
