"""ml_collections configs: `python main.py --config=configs/NAME.py --workdir=DIR`.

common.py holds every field with the official recipe's values and where each comes from;
default.py (the built-in digits, CPU-sized) and smoke.py (seconds) shrink it; volo_d*.py
are the official recipe per variant at 224, volo_d*_<size>.py its fine-tuning.
"""
