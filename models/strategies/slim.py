"""``slim``: network slimming (Liu et al., ICCV 2017). Fine-tune with an L1 penalty on the
BatchNorm scales (the pre-phase the pipeline runs), then remove the channels with the smallest
scales, then fine-tune. Global by default, as in the paper: the penalty decides which layers give
channels up."""

from typing import Annotated, ClassVar

import torch_pruning as tp
from pydantic import Field

from models.strategies.structured import StructuredOptions, structured


class SlimOptions(StructuredOptions):
    global_pruning: bool = True
    sparsity: Annotated[float, Field(gt=0)] = 1e-4
    sparsity_epochs: Annotated[int, Field(ge=1)] = 5
    PHASE_KEYS: ClassVar[frozenset[str]] = frozenset({"sparsity", "sparsity_epochs"})

    def sparsity_phase(self) -> tuple[int, float] | None:
        return self.sparsity_epochs, self.sparsity


STRATEGY = structured("slim", tp.importance.BNScaleImportance, SlimOptions, needs_batch_norm=True)
