"""slimtune from a Hugging Face script: a drop-in ``transformers.Trainer``, a callback, and recipes.

* :class:`SlimtuneTrainer` (a ``transformers.Trainer``): the step is slimtune's engine's (:mod:`.engine`), which is
  what a callback cannot reach: per-layer updates inside backward (gradient accumulation included), the offload
  engine's streamed layers and offloaded optimizer step, MeZO's forward-only step, MixLoRA's router loss. The
  Trainer keeps its own scheduler, logging, checkpoints (``optimizer.pt`` is our optimizer's ``state_dict``) and
  ``resume_from_checkpoint``.
* :func:`from_recipe`: a :class:`SlimtuneTrainer` with a recipe's model, adapter, data (same order), optimizer and
  offload plan: per step the same losses as ``slimtune train`` on that recipe.
* :class:`SlimtuneCallback`: for a stock ``transformers.Trainer``: memory per tier and MixLoRA's router load in the
  logs (:class:`SlimtuneTrainer` logs them itself, with what its engine holds and moves).
* :func:`slimtune_optimizer`: one of slimtune's optimizers (GaLore, FRUGAL, SPAM, AdamW, ...) for a stock Trainer
  (``optimizers=(slimtune_optimizer(...), None)``; the Trainer builds its scheduler around it), per-layer too.
* :func:`train_on_processes`: ``slimtune train`` launched as several processes (DDP through this route).

What a callback can and cannot change is set out in transformers' ``trainer_callback.py``: it cannot replace the
optimizer or the training step, hence the subclass.
"""

from .engine_optimizer import EngineOptimizer
from .processes import RunLog, train_on_processes
from .recipes import from_recipe, training_arguments
from .refusals import problems_under_processes
from .stock import SlimtuneCallback, memory_logs, slimtune_optimizer
from .trainer import SeededOrder, SlimtuneTrainer

__all__ = ["EngineOptimizer", "RunLog", "SeededOrder", "SlimtuneCallback", "SlimtuneTrainer", "from_recipe",
           "memory_logs", "problems_under_processes", "slimtune_optimizer", "train_on_processes",
           "training_arguments"]
