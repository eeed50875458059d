"""`python -m finetune ...` (and `torchrun -m finetune ...`) run the CLI."""

from finetune.cli import main

main()
