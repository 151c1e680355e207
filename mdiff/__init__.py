"""The app: what runs several stages (the command line, the demo and its fine-tune, smoke and toy
runs, the tiny fixture models). It sits on top of `pipeline`, `trainer` and `evals`; nothing
imports it."""
