"""Trains or evaluates VOLO.

python main.py --config=configs/default.py --workdir=/tmp/digits
python main.py --config=configs/volo_d1.py --workdir=runs/d1 --config.batch_size=512
python main.py --config=configs/volo_d1.py --config.mode=eval --config.init_from=DIR
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from volo_jax.cli import restart_with_malloc_tunables, run_cli, synchronous_cpu_dispatch

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and plots (training).")
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config"])


class _QuietLibraries(logging.logging.Filter):
    """Drops INFO records of libraries that log every checkpoint operation (orbax) or
    every gs:// file opened (gcsfs)."""

    def filter(self, record: logging.logging.LogRecord) -> bool:
        return record.levelno >= logging.logging.WARNING or not any(
            name in record.pathname for name in ("/orbax/", "/gcsfs/")
        )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, plus one line (not a stack trace) for an override of a field the
    config lacks, for which ml_collections raises AttributeError or KeyError."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:
        name = str(err).strip("\"'")
        flag = next(
            (a.split("=")[0] for a in argv if a.startswith("--config.") and name in a), "--config"
        )
        print(f"error: {flag}: the config has no field {name!r}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    if config.mode != "eval" and not FLAGS.workdir:
        raise app.UsageError("--workdir is required for training")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from volo_jax.training import evaluate, train

    def run() -> None:
        if config.mode == "eval":
            evaluate.evaluate(config, FLAGS.workdir)
        else:
            train.train_and_evaluate(config, FLAGS.workdir)

    run_cli(run)


if __name__ == "__main__":
    restart_with_malloc_tunables()
    synchronous_cpu_dispatch()
    app.run(main, flags_parser=parse_flags)
