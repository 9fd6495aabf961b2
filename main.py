"""Trains or evaluates VOLO.

python main.py --config=configs/default.py --workdir=/tmp/digits
python main.py --config=configs/volo_d1.py --workdir=runs/d1 --config.train.batch_size=512
python main.py --config=configs/volo_d1.py --config.mode=eval --config.init_from=DIR
"""

import os
import sys

from volo_jax.extras import MissingExtraError, require_extra

try:  # one line naming the extra, not an ImportError from deep inside
    require_extra("train", "training and evaluation (main.py)")
except MissingExtraError as missing:
    sys.exit(f"error: {missing}")

from absl import app, flags, logging
from ml_collections import config_flags

from volo_jax.cli import run_cli, synchronous_cpu_dispatch
from volo_jax.logs import OwnInfoOnly, quiet_native_logs

FLAGS = flags.FLAGS
MIXER_KWARGS = "model_overrides.token_mixer_kwargs"
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and plots (training).")
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config"])


def _config_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """(flag, field path) of each --config.<path>[=value] on the command line."""
    flags_given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    return [(flag, flag.removeprefix("--config.")) for flag in flags_given]


def _config_file(argv: list[str]) -> str | None:
    """The path given by --config=PATH or --config PATH (without a ':argument' suffix)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg.removeprefix("--config=")
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        return value.split(":")[0]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, plus one line (not a stack trace) for a config file that does not
    exist, and for an override of a field that moved (naming its new place) or that the
    config lacks (for which ml_collections raises AttributeError or KeyError)."""
    # Imported here, when the flags are parsed, not at the top: it imports JAX.
    from volo_jax.training.config import MOVED_FIELDS

    path = _config_file(argv)
    if path is not None and not os.path.isfile(path):
        print(
            f"error: --config: no config file {path} (the configs are in "
            f"{os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')}, "
            "e.g. configs/volo_d1.py)",
            file=sys.stderr,
        )
        sys.exit(2)

    for flag, path in _config_overrides(argv):
        if path in MOVED_FIELDS:
            print(f"error: {flag}: moved to --config.{MOVED_FIELDS[path]}", file=sys.stderr)
            sys.exit(2)
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:
        name = str(err).strip("\"'")
        flag, path = next(
            ((f, p) for f, p in _config_overrides(argv) if name in p), ("--config", "")
        )
        hint = ""
        if path.startswith(MIXER_KWARGS + "."):
            key = path.removeprefix(MIXER_KWARGS + ".")
            hint = (
                "; give the mixer's arguments as a whole: "
                f"--config.{MIXER_KWARGS}=\"{{'{key}': ...}}\""
            )
        print(f"error: {flag}: the config has no field {name!r}{hint}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    if config.mode != "eval" and not FLAGS.workdir:
        raise app.UsageError("--workdir is required for training")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(OwnInfoOnly())
    from volo_jax.training import evaluate, train

    def run() -> None:
        if config.mode == "eval":
            evaluate.evaluate(config, FLAGS.workdir)
        else:
            train.train_and_evaluate(config, FLAGS.workdir)

    run_cli(run)


if __name__ == "__main__":
    quiet_native_logs()  # before anything imports TensorFlow
    synchronous_cpu_dispatch()
    app.run(main, flags_parser=parse_flags)
