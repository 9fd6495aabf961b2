"""Training and evaluation: `train.train_and_evaluate(config, workdir)` and
`evaluate.evaluate(config)`, which main.py runs.

- config.py: every check of a config (`validate_config`), the fields that moved, and what
  several modules derive from it (model overrides, the token grid, matmul precision).
- train.py: the train state (`create_train_state`, born in its shardings), the step, and
  the loop with its init / resume order.
- evaluate.py: top-1 / top-5 with timm's eval preprocessing.
- optim.py (AdamW and the lr schedule), losses.py (token labeling, MixToken targets),
  token_labels.py (dense targets from score maps), checkpointing.py, preemption.py
  (SIGTERM, divergence), metrics.py (metrics.jsonl, TensorBoard, curves.png).
"""
