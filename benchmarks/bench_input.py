"""Input pipeline benchmark: volo-jax's tf.data training and evaluation pipelines against
timm's transforms in a torch DataLoader, on the same JPEG files, with the same
augmentation, on the same cores, in one run.

The files: `--images` JPEGs (default 384) of real photographs (the ones scikit-image and
scikit-learn ship), cropped at random and resized to ImageNet's typical 500 x 375 (every
fourth one 375 x 500), quality 90, in an image folder `<root>/train/<class>/`, and one
token-label score map per image (float16 [2, 5, 14, 14], as the official ones) in
`<root>/maps/<class>/`.

Pipelines (each in its own subprocess, pinned to the same `--cores` CPUs):

* `ours_train`: `create_train_dataset` + `TrainAugment(224)` (random resized crop, flip,
  RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, normalisation), batches of
  float32 images.
* `ours_train_maps`: the same with token-label maps (the official order: flip and
  RandAugment on the whole image, moving the map, then the crop).
* `timm_train`: `timm.data.create_transform(is_training=True)` with the same settings,
  `timm.data.ImageDataset`, `torch.utils.data.DataLoader` with `--cores` workers (no
  prefetcher: normalisation and erasing run in the workers, as ours run on the host).
* `ours_eval`: `create_eval_dataset` (resize the shorter side to 224 / 0.96 with PIL's
  bicubic, centre crop, normalise: timm's eval transform, bit-exact).
* `timm_eval`: `create_transform(is_training=False)`, the same DataLoader.

Reported per pipeline: img/s over `--batches` batches after `--warmup` batches (the
time to the first batch apart), img/s per core, and the ratios ours / timm. With
`--rounds R` every pipeline runs R times, alternating, and the report keeps each run.

  python -m benchmarks.bench_input                                # all cores, batch 64
  python -m benchmarks.bench_input --cores 1 --rounds 2 --json input.json
  python -m benchmarks.bench_input --images 16 --batch 4 --batches 2 --warmup 1  # smoke

torch and TensorFlow never share a process. `--stages` adds `ours_stages`: the training
pipeline cut after each step (read, decode, crop, resize, flip + RandAugment, the whole
augmentation), to see where the time goes; with `--ops` also each RandAugment op
alone (always applied, at the recipe's magnitude) after the resize.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_volo import REPO_ROOT, loadavg, machine_info

PIPELINES = ("ours_train", "ours_train_maps", "timm_train", "ours_eval", "timm_eval")
STAGES = "ours_stages"
RANDAUGMENT = "rand-m9-mstd0.5-inc1"
ERASE_PROB = 0.25
EVAL_CROP_PCT = 0.96  # volo_d1_224's
INPUT_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 4
MAP_SHAPE = (2, 5, 14, 14)


@dataclasses.dataclass(frozen=True)
class Config:
    images: int = 384
    batch: int = 64
    batches: int = 30  # timed batches per pipeline
    warmup: int = 4  # batches after the first, not timed
    cores: int = 0  # 0: every core this process may use
    rounds: int = 1
    ops: bool = False  # with --stages: each RandAugment op alone too
    image_size: tuple[int, int] = (500, 375)  # (width, height)
    quality: int = 90


# --------------------------------------------------------------------------- the files


def _photographs() -> list[np.ndarray]:
    """The colour photographs scikit-image and scikit-learn ship, uint8 (H, W, 3)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    shipped = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    shipped += [data.hubble_deep_field(), data.retina(), data.immunohistochemistry()]
    return [np.ascontiguousarray(p[..., :3]) for p in shipped + list(load_sample_images().images)]


def make_image_folder(root: Path, count: int, size: tuple[int, int], quality: int) -> None:
    """`count` JPEGs (`size` = (width, height); every fourth one turned to portrait) in
    `root/train/c<k>/`, each a random crop of a shipped photograph, and a float16
    [2, 5, 14, 14] score map per image in `root/maps/c<k>/`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = _photographs()
    for index in range(count):
        photo = photos[index % len(photos)]
        h, w = photo.shape[:2]
        width, height = size if index % 4 != 3 else size[::-1]
        # The largest crop of the output's aspect, scaled by 0.6-1.0, at a random place.
        scale = rng.uniform(0.6, 1.0)
        crop_w = min(w, int(h * width / height))
        crop_h = int(crop_w * height / width)
        crop_w, crop_h = int(crop_w * scale), int(crop_h * scale)
        top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
        image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        class_name = f"c{index % NUM_CLASSES}"
        for sub in ("train", "maps"):
            (root / sub / class_name).mkdir(parents=True, exist_ok=True)
        image.save(root / "train" / class_name / f"{index:05d}.JPEG", quality=quality)
        scores = rng.normal(0, 3, MAP_SHAPE[1:])
        classes = rng.integers(0, NUM_CLASSES, MAP_SHAPE[1:])
        score_map = np.stack([scores, classes]).astype(np.float16)
        np.save(root / "maps" / class_name / f"{index:05d}.npy", score_map)


# --------------------------------------------------------------------------- timing


def cpu_seconds() -> float:
    """CPU time (user + system) of this process's threads and its live child processes
    (a DataLoader's workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == me or ppid == me:
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def time_batches(batches: Iterator[Any], cfg: Config, count: Callable[[Any], int]) -> dict:
    """Times `cfg.batches` batches after the first and `cfg.warmup` more: wall time and
    the CPU time the pipeline used (images per CPU-second is the per-core rate however
    busy the machine is)."""
    start = time.perf_counter()
    first = next(batches)
    first_s = time.perf_counter() - start
    shape = _shape(first)
    for _ in range(cfg.warmup):
        next(batches)
    times, images = [], 0
    cpu_start = cpu_seconds()
    for _ in range(cfg.batches):
        tick = time.perf_counter()
        images += count(next(batches))
        times.append(time.perf_counter() - tick)
    cpu_s = cpu_seconds() - cpu_start
    total = sum(times)
    return {
        "images_per_s": images / total,
        # /proc counts clock ticks (10 ms): a very short run can show none.
        "images_per_cpu_s": images / cpu_s if cpu_s > 0 else float("nan"),
        "cpu_s": cpu_s,
        "first_batch_s": first_s,
        "batch_s": times,
        "batch_shape": shape,
    }


def _shape(batch: Any) -> dict[str, list[int]]:
    if isinstance(batch, dict):
        return {k: list(np.shape(v)) for k, v in batch.items()}
    return {str(i): list(v.shape) for i, v in enumerate(batch)}


# --------------------------------------------------------------------------- workers


def _ours_train(root: Path, cfg: Config, maps: bool) -> dict:
    from volo_jax.data.augment import TrainAugment
    from volo_jax.data.input_pipeline import create_train_dataset

    augment = TrainAugment(size=INPUT_SIZE, randaugment=RANDAUGMENT, erase_prob=ERASE_PROB)
    data = create_train_dataset(
        str(root),
        "train",
        batch_size=cfg.batch,
        augment=augment,
        seed=0,
        token_label_dir=str(root / "maps") if maps else None,
        process_index=0,
        process_count=1,
    )
    return time_batches(data.batches(0), cfg, lambda b: len(b["label"]))


def _ours_eval(root: Path, cfg: Config) -> dict:
    from volo_jax.data.input_pipeline import create_eval_dataset

    ds, _ = create_eval_dataset(
        str(root),
        "train",
        batch_size=cfg.batch,
        input_size=INPUT_SIZE,
        crop_pct=EVAL_CROP_PCT,
        interpolation="bicubic",
        mean=MEAN,
        std=STD,
        process_index=0,
        process_count=1,
    )
    return time_batches(ds.repeat().as_numpy_iterator(), cfg, lambda b: len(b["label"]))


def _allow_posterize_to_zero_bits() -> None:
    """timm's increasing posterize keeps 4 - floor(level / 10 * 4) bits: 0 at level 10,
    which RandAugment's magnitude N(9, 0.5) reaches; Pillow 13 refuses 0 bits (older
    Pillow returned a black image, as our `augment.posterize` does). Restores that."""
    from PIL import Image, ImageOps

    posterize = ImageOps.posterize

    def posterize_from_zero(image: Image.Image, bits: int) -> Image.Image:
        return image.point(lambda _: 0) if bits == 0 else posterize(image, bits)

    ImageOps.posterize = posterize_from_zero


def _timm(root: Path, cfg: Config, train: bool, cores: int) -> dict:
    import torch
    from timm.data import ImageDataset, create_transform

    _allow_posterize_to_zero_bits()  # in the workers too: the DataLoader forks them

    if train:
        transform = create_transform(
            INPUT_SIZE,
            is_training=True,
            auto_augment=RANDAUGMENT,
            interpolation="random",
            re_prob=ERASE_PROB,
            re_mode="pixel",
            re_count=1,
            mean=MEAN,
            std=STD,
        )
    else:
        transform = create_transform(
            INPUT_SIZE,
            is_training=False,
            crop_pct=EVAL_CROP_PCT,
            interpolation="bicubic",
            mean=MEAN,
            std=STD,
        )
    loader = torch.utils.data.DataLoader(
        ImageDataset(str(root / "train"), transform=transform),
        batch_size=cfg.batch,
        shuffle=train,
        drop_last=train,
        num_workers=cores,
        persistent_workers=True,
    )

    def forever() -> Iterator[Any]:
        while True:
            yield from loader

    return {"transform": str(transform), **time_batches(forever(), cfg, lambda b: len(b[1]))}


def _ours_stages(root: Path, cfg: Config) -> dict:
    """img/s of the training augmentation cut after each of its steps, on the same files
    with the same parallel map as `create_train_dataset` (batches of the outputs, or of
    their shapes where they differ in size)."""
    from volo_jax.data import augment as aug
    from volo_jax.data.input_pipeline import (
        _list_image_folder,
        _train_options,
        configure_tensorflow,
    )
    from volo_jax.data.score_maps import load_score_map
    from volo_jax.data.tf_quiet import tf

    configure_tensorflow()
    paths, _ = _list_image_folder(root / "train")
    full = aug.TrainAugment(size=INPUT_SIZE, randaugment=RANDAUGMENT, erase_prob=ERASE_PROB)
    spec = aug.parse_randaugment(RANDAUGMENT)

    def crop(data: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        return aug.decode_random_crop(data, seed, full.crop_scale, full.crop_ratio)[0]

    def resized(data: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        return aug.resize_crop(crop(data, seed), seed, INPUT_SIZE, full.interpolation)

    def decoded(data: tf.Tensor) -> tf.Tensor:
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    map_path = str(next((root / "maps").rglob("*.npy")))

    def with_map(data: tf.Tensor, seed: tf.Tensor, score_map: tf.Tensor) -> tf.Tensor:
        return full.from_file(data, seed, score_map)["image"]

    def read_map() -> tf.Tensor:
        score_map = tf.numpy_function(
            lambda: load_score_map(map_path), [], tf.float32, stateful=False
        )
        return tf.ensure_shape(score_map, MAP_SHAPE)

    stages: dict[str, Any] = {
        "read the file": lambda data, seed: tf.strings.length(data),
        "decode the whole image": lambda data, seed: tf.shape(decoded(data)),
        "decode the crop window": lambda data, seed: tf.shape(crop(data, seed)),
        "+ resize to 224": resized,
        "+ flip and RandAugment": lambda data, seed: aug.rand_augment(
            tf.reverse(resized(data, seed), [1]), seed, spec
        ),
        "TrainAugment.from_file (all of it)": lambda data, seed: full.from_file(data, seed)[
            "image"
        ],
        "TrainAugment on the decoded image": lambda data, seed: full(decoded(data), seed)["image"],
        "with a score map (constant)": lambda data, seed: with_map(data, seed, tf.zeros(MAP_SHAPE)),
        "with a score map read in numpy_function": lambda data, seed: with_map(
            data, seed, read_map()
        ),
    }
    if cfg.ops:  # each RandAugment op alone (always applied) after the resize
        for op, level_to_arg, _ in aug._ops(spec.increasing):
            arg = level_to_arg(tf.constant(spec.magnitude), tf.constant(1.0))
            stages[f"+ {op.__name__} (m{spec.magnitude:g})"] = lambda data, seed, op=op, arg=arg: (
                op(resized(data, seed), arg)
            )
    results = {}
    for name, fn in stages.items():
        ds = tf.data.Dataset.from_tensor_slices(paths).repeat().enumerate()
        ds = ds.map(
            lambda i, path, fn=fn: fn(
                tf.io.read_file(path), tf.stack([tf.constant(0, tf.int64), i])
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = ds.batch(cfg.batch).prefetch(2).with_options(_train_options())
        timed = time_batches(ds.as_numpy_iterator(), cfg, lambda b: len(b))
        results[name] = {k: timed[k] for k in ("images_per_s", "images_per_cpu_s")}
    return {"stages": results}


def run_pipeline(name: str, root: Path, cfg: Config, cores: int) -> dict:
    """Measures one pipeline in this process."""
    if name == "ours_train":
        return _ours_train(root, cfg, maps=False)
    if name == "ours_train_maps":
        return _ours_train(root, cfg, maps=True)
    if name == "ours_eval":
        return _ours_eval(root, cfg)
    if name == "timm_train":
        return _timm(root, cfg, train=True, cores=cores)
    if name == "timm_eval":
        return _timm(root, cfg, train=False, cores=cores)
    if name == STAGES:
        return _ours_stages(root, cfg)
    raise ValueError(f"unknown pipeline {name!r}; expected one of {(*PIPELINES, STAGES)}")


def _worker(args: argparse.Namespace) -> int:
    cfg = Config(**json.loads(args.worker_config))
    cores = list(range(cfg.cores))
    os.sched_setaffinity(0, cores)  # before any framework starts its threads
    record = run_pipeline(args.worker, Path(args.worker_root), cfg, len(cores))
    Path(args.worker_out).write_text(json.dumps(record))
    return 0


def _run_subprocess(name: str, root: Path, cfg: Config, workdir: Path, timeout: float) -> dict:
    out = workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_input",
        "--worker",
        name,
        "--worker-root",
        str(root),
        "--worker-config",
        json.dumps(dataclasses.asdict(cfg)),
        "--worker-out",
        str(out),
    ]
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    load_before = loadavg()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"pipeline": name, "status": "failed", "reason": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"pipeline": name, "status": "failed", "reason": f"exit {proc.returncode}: {tail}"}
    record = json.loads(out.read_text())
    return {"pipeline": name, "status": "ok", "loadavg": [load_before, loadavg()], **record}


# --------------------------------------------------------------------------- the run


def run(
    cfg: Config,
    pipelines: Sequence[str],
    root: Path | None = None,
    log: Callable[[str], None] = print,
    timeout: float = 900.0,
) -> dict:
    """Makes the files (unless `root` has them), runs every pipeline `cfg.rounds` times,
    alternating, each in a subprocess pinned to `cfg.cores` CPUs; returns the report."""
    available = sorted(os.sched_getaffinity(0))
    cores = cfg.cores or len(available)
    if cores > len(available):
        raise ValueError(f"--cores {cores}: this process may use only {len(available)} CPUs.")
    cfg = dataclasses.replace(cfg, cores=cores)
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        workdir = Path(tmp)
        if root is None:
            root = workdir / "images"
        if not (root / "train").is_dir():
            log(f"writing {cfg.images} JPEGs and score maps to {root}")
            make_image_folder(root, cfg.images, cfg.image_size, cfg.quality)
        results = []
        for round_index in range(cfg.rounds):
            for name in pipelines:
                record = _run_subprocess(name, root, cfg, workdir, timeout)
                record["round"] = round_index
                results.append(record)
                log(_summary(record, cores))
    jpeg_bytes = [p.stat().st_size for p in (root / "train").rglob("*.JPEG")] if root else []
    report = {
        "config": dataclasses.asdict(cfg),
        "machine": machine_info(),
        "files": {"count": len(jpeg_bytes), "mean_kib": float(np.mean(jpeg_bytes) / 1024)}
        if jpeg_bytes
        else {},
        "results": results,
    }
    report["summary"] = summarise(results, cores)
    return report


def summarise(results: Sequence[dict], cores: int) -> dict:
    """Per pipeline: median img/s over rounds, per core, the spread; ours / timm ratios."""
    summary: dict[str, Any] = {}
    for name in dict.fromkeys(r["pipeline"] for r in results):
        runs = [r for r in results if r["pipeline"] == name and "images_per_s" in r]
        if runs:
            rates = [r["images_per_s"] for r in runs]
            per_cpu_s = [r["images_per_cpu_s"] for r in runs]
            summary[name] = {
                "images_per_s": statistics.median(rates),
                "images_per_s_per_core": statistics.median(rates) / cores,
                "images_per_cpu_s": statistics.median(per_cpu_s),
                "runs": rates,
                "runs_per_cpu_s": per_cpu_s,
            }
    ratios = {}
    for ours, theirs in [
        ("ours_train", "timm_train"),
        ("ours_train_maps", "timm_train"),
        ("ours_eval", "timm_eval"),
    ]:
        if ours in summary and theirs in summary:
            ratios[f"{ours}/{theirs}"] = {
                key: summary[ours][key] / summary[theirs][key]
                for key in ("images_per_s", "images_per_cpu_s")
            }
    summary["ratios"] = ratios
    return summary


def _summary(r: dict, cores: int) -> str:
    if r["status"] != "ok":
        return f"{r['pipeline']:18s} {r['status']}: {r['reason'][-500:]}"
    if "stages" in r:
        return "\n".join(
            f"  {name:42s} {s['images_per_s']:8.1f} img/s {s['images_per_cpu_s']:8.1f} img/CPU-s"
            for name, s in r["stages"].items()
        )
    rate = r["images_per_s"]
    return (
        f"{r['pipeline']:18s} {rate:8.1f} img/s  {rate / cores:7.1f} img/s/core  "
        f"{r['images_per_cpu_s']:7.1f} img/CPU-s  first batch {r['first_batch_s']:.1f} s  "
        f"load {r['loadavg'][0]}"
    )


def format_table(report: dict) -> str:
    summary, cores = report["summary"], report["config"]["cores"]
    lines = [
        f"{report['machine']['cpu_model']} ({report['machine']['cpu']}), {cores} core(s), "
        f"batch {report['config']['batch']}, {report['files'].get('count')} JPEGs",
        "| pipeline | img/s | img/s per core | img per CPU-second | runs (img/s) |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        if name == "ratios":
            continue
        runs = ", ".join(f"{v:.0f}" for v in row["runs"])
        lines.append(
            f"| {name} | {row['images_per_s']:.0f} | {row['images_per_s_per_core']:.0f} | "
            f"{row['images_per_cpu_s']:.0f} | {runs} |"
        )
    for name, value in summary["ratios"].items():
        lines.append(
            f"{name}: {value['images_per_s']:.2f}x img/s, "
            f"{value['images_per_cpu_s']:.2f}x img per CPU-second"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--batches", type=int, default=defaults.batches, help="timed batches")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--cores", type=int, default=0, help="CPUs per pipeline (0: all)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--stages", action="store_true", help="also time ours step by step")
    parser.add_argument(
        "--ops", action="store_true", help="with --stages: each RandAugment op alone too"
    )
    parser.add_argument("--root", default=None, help="reuse (or keep) the files here")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker(args)
    pipelines = [p for p in args.pipelines.split(",") if p]
    unknown = set(pipelines) - set(PIPELINES)
    if unknown:
        raise SystemExit(f"unknown pipelines {sorted(unknown)}; known: {', '.join(PIPELINES)}")
    if args.stages:
        pipelines.append(STAGES)
    cfg = Config(
        images=args.images,
        batch=args.batch,
        batches=args.batches,
        warmup=args.warmup,
        cores=args.cores,
        rounds=args.rounds,
        ops=args.ops,
    )
    report = run(cfg, pipelines, Path(args.root) if args.root else None)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
