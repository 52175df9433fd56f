"""``slim``: network slimming (Liu et al., ICCV 2017). Fine-tune with an L1 penalty on the
BatchNorm scales (the pre-phase the pipeline runs), then remove the channels with the smallest
scales, then fine-tune. Global by default, as in the paper: the penalty decides which layers give
channels up.

The strength. The penalty is ``sparsity * sum|gamma|`` added to the *mean* batch loss, and it
acts per optimiser step: what matters is ``lr x sparsity x steps``. Liu et al. run 1e-4 for 160
epochs of CIFAR (~125k steps at lr 0.1); a 5-epoch phase has a few hundred steps at most, so
1e-4 moves no scale by more than ~1e-4 and the pruned channels are those pruned without it.
Measured on digits (BaseNet (32, 64) with BatchNorm, 10 epochs at lr 0.05, then 5 epochs = 95
steps of phase, slim at 0.5, benchmarks/results/slim-sparsity-2026-11-29.md):

    lr 0.05, strength:         0      1e-3   1e-2   3e-2   0.05   0.1    0.2
    |gamma| < 1e-2:            0%     0%     0%     0%     19%    70%    83%
    pruned as without penalty: 100%   100%   100%   98%    88%    60%    46%
    accuracy after pruning:    75.7   76.1   79.2   92.6   96.0   90.1   68.7
    after 3 epochs fine-tune:  98.5   98.8   98.7   99.3   99.0   98.8   97.3

At lr 0.01 the same columns need 0.3 (70% near zero, 71% same); 0.1 there leaves 98% the same.
Default 0.1: the smallest strength at lr 0.05 (``train.lr``) that drives more scales to ~0 than
slim removes at ratio 0.5. With more steps per phase (a larger data set) scale it down in
proportion; with a smaller lr, up.
"""

from typing import Annotated, ClassVar

import torch_pruning as tp
from pydantic import Field

from shrinkflow.models.strategies.structured import StructuredOptions, structured


class SlimOptions(StructuredOptions):
    """``sparsity``: the L1 strength on BatchNorm scales during the ``sparsity_epochs`` phase
    (see the module docstring for how it was chosen)."""

    global_pruning: bool = True
    sparsity: Annotated[float, Field(gt=0)] = 0.1
    sparsity_epochs: Annotated[int, Field(ge=1)] = 5
    PHASE_KEYS: ClassVar[frozenset[str]] = frozenset({"sparsity", "sparsity_epochs"})

    def sparsity_phase(self) -> tuple[int, float] | None:
        return self.sparsity_epochs, self.sparsity


STRATEGY = structured("slim", tp.importance.BNScaleImportance, SlimOptions, needs_batch_norm=True)
