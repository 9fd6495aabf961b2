"""predict's fixed-size batches: one compiled program for any number of images, and the
same probabilities as the whole set in one batch."""

from __future__ import annotations

import jax
import numpy as np

from configs.smoke import get_config
from volo_jax.data import eval_transform
from volo_jax.models import create_model, pretrained_cfg
from volo_jax.predict import _probabilities, predict
from volo_jax.progress import Progress
from volo_jax.training.config import model_overrides
from volo_jax.training.train import initial_variables

NAME = "volo_d1_224"


def test_any_number_of_images_runs_one_compiled_program(tmp_path):
    config = get_config()
    model = create_model(NAME, **model_overrides(config))
    variables = initial_variables(model, config.img_size, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (*rng.integers(20, 50, 2), 3), dtype=np.uint8) for _ in range(11)
    ]
    cfg = pretrained_cfg(NAME)
    stacked = np.stack(
        [
            eval_transform(im, model.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
            for im in images
        ]
    )
    # What predict computed before it batched: every image in one batch.
    expected = np.asarray(jax.nn.softmax(model.apply(variables, stacked), axis=-1))

    first = predict(images[:1], model, variables, NAME, batch_size=4)
    np.testing.assert_allclose(first, expected[:1], atol=1e-6)
    compiled = _probabilities._cache_size()
    for n in (2, 4, 5, 11):
        with open(tmp_path / f"{n}.txt", "w") as f, Progress(n, unit="img", stream=f) as bar:
            probs = predict(images[:n], model, variables, NAME, batch_size=4, progress=bar)
        assert probs.shape == (n, model.num_classes)
        np.testing.assert_allclose(probs, expected[:n], atol=1e-6)
        assert (tmp_path / f"{n}.txt").read_text().startswith(f"step {n}/{n} img done in ")
    assert _probabilities._cache_size() == compiled  # no new compilation for any n
    assert predict([], model, variables, NAME).shape == (0, model.num_classes)
