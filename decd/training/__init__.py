"""Training DECD with `transformers.Trainer`.

- `collator`: training rows -> model inputs (IRRA augmentation, MCM masking);
- `sampler`: the identity-balanced P x K sampler;
- `trainer`: `DecdTrainer` and `DecdTrainingArguments` (defaults: the method's recipe, docs/method.md);
- `recipe`: the model and data arguments of a recipe file (`recipes/*.json`), how one is read, and the model
  it builds;
- `memory`: the CPU allocator setting a CPU run applies;
- `runs`: what a run folder holds: another run is never overwritten, a checkpoint is complete or refused.
"""

from .collator import DecdTrainingCollator, augment_person_crops
from .memory import keep_freed_cpu_memory
from .sampler import IdentityBalancedSampler
from .trainer import DecdTrainer, DecdTrainingArguments, NonFiniteLossError

__all__ = [
    "DecdTrainer",
    "DecdTrainingArguments",
    "DecdTrainingCollator",
    "IdentityBalancedSampler",
    "NonFiniteLossError",
    "augment_person_crops",
    "keep_freed_cpu_memory",
]
