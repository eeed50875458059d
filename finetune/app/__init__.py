"""The tool's commands as library calls: run, evaluate, predict, export, report, advise, compare, check."""
