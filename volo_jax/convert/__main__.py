"""python -m volo_jax.convert --model volo_d1_224 --src d1_224_84.2.pth.tar --dst DIR"""

from __future__ import annotations

import argparse

from volo_jax.cli import run_cli
from volo_jax.convert.torch_checkpoint import WRAPPER_KEYS
from volo_jax.logs import quiet_native_logs


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m volo_jax.convert",
        description="Convert an official VOLO (.pth.tar) or timm (.pth, .safetensors) "
        "checkpoint into a volo-jax weights directory.",
    )
    parser.add_argument("--model", required=True, help="registered name, e.g. volo_d1_224")
    parser.add_argument("--src", required=True, help=".pth.tar, .pth, .bin or .safetensors file")
    parser.add_argument("--dst", required=True, help="output weights directory")
    parser.add_argument(
        "--key",
        choices=WRAPPER_KEYS,
        default=None,
        help="wrapper entry to read from a training checkpoint (default: the first present)",
    )
    args = parser.parse_args()

    from volo_jax.convert import convert_checkpoint
    from volo_jax.models import pretrained_cfg

    pretrained_cfg(args.model)  # unknown names fail here, before the file is read
    variables = convert_checkpoint(args.model, args.src, args.dst, key=args.key)
    count = sum(v.size for v in __import__("jax").tree_util.tree_leaves(variables["params"]))
    print(f"wrote {args.model} ({count:,} parameters) to {args.dst}")
    return 0


if __name__ == "__main__":
    quiet_native_logs()  # before anything imports TensorFlow
    run_cli(main)
