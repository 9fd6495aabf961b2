"""Training (volo_jax/training): the train step and loop, resume and preemption, optimizer and
schedule, losses and token labels (against the official code), configs and their checks,
evaluation."""
