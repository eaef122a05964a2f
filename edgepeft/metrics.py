"""Old path of edgepeft.evaluation.metrics, kept so that existing imports keep working."""

from edgepeft.evaluation.metrics import *  # noqa: F401,F403
from edgepeft.evaluation.metrics import (  # noqa: F401
    METRICS,
    exact_match,
    normalize,
    rouge_l,
    rouge_tokens,
    score,
    score_example,
    token_f1,
)
