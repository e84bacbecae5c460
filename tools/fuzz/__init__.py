"""Fuzzing every reader of untrusted input: `python -m tools.fuzz TARGET --seconds N`.

Targets (tools/fuzz/targets.py) wrap the readers of checkpoints, LoRA files, engine dirs,
prompts, PNG infotext and Triton requests; the oracle and drivers are in engine.py, the
mutators in mutate.py. Findings are kept as regression inputs under tests/fuzz/regressions/.
"""
