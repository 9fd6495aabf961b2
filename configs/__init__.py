"""ml_collections configs: `python main.py --config=configs/NAME.py --workdir=DIR`."""
