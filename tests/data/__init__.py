"""Input (volo_jax/data): eval transforms against timm, the tf.data pipelines, the training
augmentation, ImageNet preparation, token-labeling score maps."""
