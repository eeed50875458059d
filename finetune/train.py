"""Fine-tuning (partial-finetune, full-finetune): being built; see issue 5."""

from __future__ import annotations

from finetune.errors import RecipeError


def run_finetune(ctx):
    raise RecipeError(f"strategy {ctx.recipe.name!r} is not available yet", "use --strategy linear-probe")
