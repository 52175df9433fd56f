"""``prune_l1``: structured channel pruning ranked by the L1 norm of each channel group."""

import torch_pruning as tp

from shrinkflow.models.strategies.structured import structured

STRATEGY = structured("prune_l1", lambda: tp.importance.GroupMagnitudeImportance(p=1))
