"""``prune_taylor``: structured channel pruning ranked by first-order Taylor importance
(|weight x gradient|) on a calibration batch, re-scored at every iterative step."""

import torch_pruning as tp

from shrinkflow.models.strategies.structured import structured

STRATEGY = structured("prune_taylor", tp.importance.GroupTaylorImportance, needs_grad=True)
