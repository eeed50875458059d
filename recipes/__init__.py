"""The packaged recipes: one TOML file per cell of the transfer-learning table.

This folder ships inside the wheel as the package `finetune.recipe_files` (see pyproject.toml)
and is read with `importlib.resources` by `finetune.recipes`; edit the TOML files, not this one.
"""
