"""``prune_fpgm``: structured channel pruning by geometric median (He et al., "Filter Pruning via
Geometric Median", CVPR 2019): the filters closest to the others' geometric median are the most
replaceable and go first, whatever their norm."""

import torch_pruning as tp

from shrinkflow.models.strategies.structured import structured

STRATEGY = structured("prune_fpgm", lambda: tp.importance.FPGMImportance(p=2))
