"""slimtune.finetune: recipes, model/data/adapter building, the training loop, checkpoints.

Public API::

    from slimtune.finetune import load_recipe, train
    result = train(load_recipe("configs/quickstart.yaml", ["training.max_steps=50"]))
"""

from .errors import CheckpointError, DataError, RecipeError, SlimtuneError
from .recipe import Recipe, load_recipe, recipe_docs, recipe_from_dict


def train(recipe: Recipe, progress: bool = True):
    """Run a validated recipe end to end; returns a :class:`~slimtune.finetune.trainer.TrainResult`."""
    from .build import prepare
    from .trainer import Trainer

    return Trainer(recipe, prepare(recipe), progress=progress).train()


__all__ = ["CheckpointError", "DataError", "Recipe", "RecipeError", "SlimtuneError", "load_recipe", "recipe_docs",
           "recipe_from_dict", "train"]
