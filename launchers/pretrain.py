"""Pretrain data2vec 2.0 (the launcher script: ``deepspeed``/``torchrun``/``srun`` start it per process).

    deepspeed [--num_gpus N] launchers/pretrain.py --ds_config ds_configs/X.json --preset NAME|path.yaml \\
              [--run_dir DIR] [--resume auto|PATH] [--profile] [section.key=value ...]

Everything is in :mod:`d2v2scale.pretrain` (also installed as ``d2v2scale-pretrain``); see ``--help``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2v2scale.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
