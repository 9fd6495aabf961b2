"""volo-jax-convert --model volo_d1_224 --src d1_224_84.2.pth.tar --dst OUT.safetensors
(or python -m volo_jax.convert ...)"""

from __future__ import annotations

import argparse
import os

from volo_jax.cli import prog_name, run_cli
from volo_jax.convert.torch_checkpoint import WRAPPER_KEYS
from volo_jax.logs import quiet_native_logs


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=prog_name("volo_jax.convert"),
        description="Convert an official VOLO (.pth.tar) or timm (.pth, .bin, .safetensors) "
        "checkpoint into volo-jax weights: one .safetensors file (model name, overrides and "
        "class names in its metadata) or a weights directory.",
    )
    parser.add_argument("--model", required=True, help="registered name, e.g. volo_d1_224")
    parser.add_argument(
        "--src",
        required=True,
        help=".safetensors (no PyTorch needed), or .pth.tar, .pth, .bin (needs volo-jax[torch])",
    )
    parser.add_argument(
        "--dst",
        required=True,
        help="output: a file ending in .safetensors, or a weights directory (any other path)",
    )
    parser.add_argument(
        "--key",
        choices=WRAPPER_KEYS,
        default=None,
        help="wrapper entry to read from a training checkpoint (default: the first present)",
    )
    parser.add_argument(
        "--class-names",
        default=None,
        metavar="FILE",
        help="a text file with one class name a line, in class order, stored with the "
        "weights (default: ImageNet's for a 1000-class model)",
    )
    args = parser.parse_args()

    from volo_jax.convert import convert_checkpoint
    from volo_jax.errors import ConfigError
    from volo_jax.models import pretrained_cfg

    pretrained_cfg(args.model)  # unknown names fail here, before the file is read
    class_names = None
    if args.class_names is not None:
        if not os.path.isfile(args.class_names):
            raise ConfigError(f"--class-names: file not found: {args.class_names}")
        with open(args.class_names, encoding="utf-8") as f:
            class_names = [line.strip() for line in f if line.strip()]
    variables = convert_checkpoint(
        args.model, args.src, args.dst, key=args.key, class_names=class_names
    )
    count = sum(v.size for v in __import__("jax").tree_util.tree_leaves(variables["params"]))
    print(f"wrote {args.model} ({count:,} parameters) to {args.dst}")
    return 0


def run() -> None:
    """The `volo-jax-convert` command."""
    quiet_native_logs()  # before anything imports TensorFlow
    run_cli(main)


if __name__ == "__main__":
    run()
