"""create_eval_dataset on small real datasets built offline (a TFDS dataset and an image folder)."""

import math

import numpy as np
import pytest
from PIL import Image

from volo_jax.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, eval_transform, load_image
from volo_jax.errors import ConfigError, DatasetError

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
skimage_data = pytest.importorskip("skimage.data")
input_pipeline = pytest.importorskip("volo_jax.data.input_pipeline")

INPUT_SIZE = 32
TRANSFORM = {
    "input_size": INPUT_SIZE,
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
}


def _source_images() -> list[np.ndarray]:
    """Seven small photo crops of different shapes, uint8 (H, W, 3)."""
    photos = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut()]
    shapes = [(40, 60), (64, 48), (50, 50), (33, 70), (70, 41), (45, 52), (36, 36)]
    return [
        photos[i % 3][10 * i : 10 * i + h, 5 * i : 5 * i + w] for i, (h, w) in enumerate(shapes)
    ]


SOURCES = _source_images()


class VoloJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """A TFDS image dataset whose label is the example's index into SOURCES."""

    VERSION = tfds.core.Version("1.0.0")
    # Where tfds looks for metadata / checksums; its inference fails for test modules.
    code_path = tfds.core.Path(__file__)
    pkg_dir_path = code_path.parent

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=len(SOURCES)),
                }
            )
        )

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for index, image in enumerate(SOURCES):
            yield index, {"image": image, "label": index}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    VoloJaxTinyImages(data_dir=data_dir).download_and_prepare()
    return data_dir


def _collect(ds) -> dict[str, np.ndarray]:
    """Concatenates all batches; checks each batch's shapes and dtypes on the way."""
    batches = list(ds.as_numpy_iterator())
    for batch in batches:
        batch_size = len(batch["mask"])
        assert batch["image"].shape == (batch_size, INPUT_SIZE, INPUT_SIZE, 3)
        assert batch["image"].dtype == np.float32
        assert batch["label"].shape == (batch_size,) and batch["label"].dtype == np.int32
        assert batch["mask"].dtype == bool
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def test_tfds_batches_padding_and_pixels(tfds_dir):
    ds, num_examples = input_pipeline.create_eval_dataset(
        "volo_jax_tiny_images", "validation", batch_size=3, data_dir=tfds_dir, **TRANSFORM
    )
    assert num_examples == len(SOURCES)
    batches = list(ds.as_numpy_iterator())
    assert len(ds) == len(batches) == 3
    assert [batch["mask"].sum() for batch in batches] == [3, 3, 1]
    data = _collect(ds)
    labels = data["label"][data["mask"]]
    assert sorted(labels) == list(range(len(SOURCES)))  # Every example exactly once.
    for label, image in zip(labels, data["image"][data["mask"]], strict=True):
        np.testing.assert_array_equal(image, eval_transform(SOURCES[label], **TRANSFORM))
    np.testing.assert_array_equal(data["image"][~data["mask"]], 0)
    np.testing.assert_array_equal(data["label"][~data["mask"]], 0)


def test_tfds_num_examples(tfds_dir):
    """num_examples keeps the first examples in the (deterministic) stored order."""

    def labels(**kwargs) -> list[int]:
        ds, num_examples = input_pipeline.create_eval_dataset(
            "volo_jax_tiny_images",
            "validation",
            batch_size=4,
            data_dir=tfds_dir,
            **kwargs,
            **TRANSFORM,
        )
        data = _collect(ds)
        assert num_examples == data["mask"].sum()
        return data["label"][data["mask"]].tolist()

    assert labels(num_examples=5) == labels()[:5]
    assert labels(num_examples=100) == labels()


@pytest.mark.parametrize("process_count", [2, 3])
def test_tfds_process_shards_cover_split_once(tfds_dir, process_count):
    """Shards are disjoint, cover the split, and yield the same number of batches."""
    labels, num_batches = [], set()
    for process_index in range(process_count):
        ds, num_examples = input_pipeline.create_eval_dataset(
            "volo_jax_tiny_images",
            "validation",
            batch_size=2,
            data_dir=tfds_dir,
            process_index=process_index,
            process_count=process_count,
            **TRANSFORM,
        )
        assert num_examples == len(SOURCES)
        data = _collect(ds)
        num_batches.update({len(ds), len(data["mask"]) // 2})
        labels += data["label"][data["mask"]].tolist()
    assert sorted(labels) == list(range(len(SOURCES)))
    assert num_batches == {math.ceil(math.ceil(len(SOURCES) / process_count) / 2)}


def test_unprepared_imagenet_explains_how_to_prepare(tmp_path):
    with pytest.raises(DatasetError) as info:
        input_pipeline.create_eval_dataset(
            "imagenet2012", "validation", batch_size=8, data_dir=str(tmp_path), **TRANSFORM
        )
    message = str(info.value)
    assert "'imagenet2012' is not prepared" in message
    assert str(tmp_path) in message
    assert "ILSVRC2012_img_val.tar" in message
    assert f"{tmp_path}/downloads/manual" in message
    assert f"python -m volo_jax.data.prepare imagenet2012 --data_dir={tmp_path}" in message
    assert not any(tmp_path.iterdir())  # Nothing downloaded or created.


def test_unknown_dataset_split_and_features(tfds_dir, tmp_path):
    with pytest.raises(DatasetError, match="no_such_dataset_xyz"):
        input_pipeline.create_eval_dataset(
            "no_such_dataset_xyz", "validation", batch_size=2, data_dir=str(tmp_path), **TRANSFORM
        )
    with pytest.raises(DatasetError, match="cannot read split 'train'"):
        input_pipeline.create_eval_dataset(
            "volo_jax_tiny_images", "train", batch_size=2, data_dir=tfds_dir, **TRANSFORM
        )
    with pytest.raises(DatasetError, match="no label feature 'class'"):
        input_pipeline.create_eval_dataset(
            "volo_jax_tiny_images",
            "validation",
            batch_size=2,
            data_dir=tfds_dir,
            label_key="class",
            **TRANSFORM,
        )


def test_rejects_bad_config(tfds_dir):
    with pytest.raises(ConfigError, match="interpolation"):
        input_pipeline.create_eval_dataset(
            "volo_jax_tiny_images",
            "validation",
            batch_size=2,
            data_dir=tfds_dir,
            **{**TRANSFORM, "interpolation": "area"},
        )
    with pytest.raises(ConfigError, match="positive"):
        input_pipeline.create_eval_dataset(
            "volo_jax_tiny_images", "validation", batch_size=0, data_dir=tfds_dir, **TRANSFORM
        )
    with pytest.raises(ConfigError, match="process_index"):
        input_pipeline.create_eval_dataset(
            "volo_jax_tiny_images",
            "validation",
            batch_size=2,
            data_dir=tfds_dir,
            process_index=2,
            process_count=2,
            **TRANSFORM,
        )
    with pytest.raises(ConfigError, match="plain split name"):
        input_pipeline.create_eval_dataset(
            "volo_jax_tiny_images",
            "validation[:3]",
            batch_size=2,
            data_dir=tfds_dir,
            num_examples=2,
            **TRANSFORM,
        )


@pytest.fixture
def image_folder(tmp_path):
    """<root>/val/<class>/ with PNG, JPEG, grayscale and RGBA files; returns (root, files)."""
    files = {  # class -> image files, created out of sorted order.
        "n02_cat": [("b.png", SOURCES[0]), ("a.jpg", SOURCES[1])],
        "n01_coffee": [
            ("x.PNG", SOURCES[2]),
            ("gray.png", SOURCES[3][..., 0]),
            ("nested/rgba.png", np.dstack([SOURCES[4], SOURCES[4][..., :1]])),
        ],
        "n03_empty": [],
    }
    for class_name, images in files.items():
        (tmp_path / "val" / class_name).mkdir(parents=True)
        for name, image in images:
            path = tmp_path / "val" / class_name / name
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(image).save(path)
    (tmp_path / "val" / "n01_coffee" / "notes.txt").write_text("not an image, ignored")
    expected = [
        ("n01_coffee/gray.png", 0),
        ("n01_coffee/nested/rgba.png", 0),
        ("n01_coffee/x.PNG", 0),
        ("n02_cat/a.jpg", 1),
        ("n02_cat/b.png", 1),
    ]
    return tmp_path, [(tmp_path / "val" / name, label) for name, label in expected]


def test_image_folder(image_folder):
    root, expected = image_folder
    ds, num_examples = input_pipeline.create_eval_dataset(
        str(root), "val", batch_size=4, **TRANSFORM
    )
    assert num_examples == len(expected)
    data = _collect(ds)
    assert data["mask"].tolist() == [True] * 5 + [False] * 3
    assert data["label"][:5].tolist() == [label for _, label in expected]
    for (path, _), image in zip(expected, data["image"][data["mask"]], strict=True):
        np.testing.assert_array_equal(image, eval_transform(load_image(path), **TRANSFORM))


def test_image_folder_shards(image_folder):
    root, expected = image_folder
    sources = []
    for process_index in range(2):
        ds, _ = input_pipeline.create_eval_dataset(
            str(root),
            "val",
            batch_size=2,
            process_index=process_index,
            process_count=2,
            **TRANSFORM,
        )
        data = _collect(ds)
        assert len(data["mask"]) == 4  # ceil(3 / 2) batches of 2 on both processes.
        sources += [image.tobytes() for image in data["image"][data["mask"]]]
    assert sources == [
        eval_transform(load_image(path), **TRANSFORM).tobytes() for path, _ in expected
    ]


def test_image_folder_errors(image_folder):
    root, _ = image_folder
    with pytest.raises(DatasetError, match="no split folder 'train'"):
        input_pipeline.create_eval_dataset(str(root), "train", batch_size=2, **TRANSFORM)
    corrupt = root / "val" / "n02_cat" / "c.png"
    corrupt.write_bytes(b"not a png")
    ds, _ = input_pipeline.create_eval_dataset(str(root), "val", batch_size=8, **TRANSFORM)
    with pytest.raises(tf.errors.OpError, match=f"Cannot read image {corrupt}"):
        list(ds.as_numpy_iterator())


def test_class_names_of_a_tfds_dataset_and_of_an_image_folder(tfds_dir, tmp_path):
    # What a fine-tuning config without num_classes reads (training.config.complete_config).
    names = input_pipeline.class_names("volo_jax_tiny_images", "validation", tfds_dir)
    assert names == [str(i) for i in range(len(SOURCES))]  # ClassLabel(num_classes=7)
    for split, classes in (("train", ("tabby", "espresso")), ("validation", ("tabby",))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
    assert input_pipeline.class_names(str(tmp_path), "train") == ["espresso", "tabby"]
    with pytest.raises(DatasetError, match="no split folder 'test'"):
        input_pipeline.class_names(str(tmp_path), "test")
