"""Old path of edgepeft.evaluation.report, kept so that existing imports keep working."""

from edgepeft.evaluation.report import *  # noqa: F401,F403
from edgepeft.evaluation.report import (  # noqa: F401
    BASE,
    EvalReport,
    TargetResult,
    choose_targets,
    score_target,
)
