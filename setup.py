"""Install d2v2scale.

torch and DeepSpeed are deliberately NOT in install_requires: a bare ``torch`` requirement can
pull a multi-GB CUDA build or replace the torch already installed, and DeepSpeed must be built
with ``DS_BUILD_OPS=0``. Install them first, in this order (``make venv`` does exactly this):

    pip install torch==2.13.0          # or the CUDA build matching your cluster
    DS_BUILD_OPS=0 pip install deepspeed==0.19.8
    pip install -e .[test]
"""
from setuptools import find_packages, setup

setup(
    name="d2v2scale",
    version="0.1.0",
    description="data2vec 2.0 pre-training with DeepSpeed ZeRO and Megatron-style tensor parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["d2v2scale", "d2v2scale.*"]),
    package_data={"d2v2scale": ["presets/*.yaml", "ds_configs/*.json", "py.typed"]},
    entry_points={"console_scripts": [
        "d2v2scale-pretrain = d2v2scale.pretrain:entry",
        "d2v2scale-plan = d2v2scale.plan:entry",
        "d2v2scale-report = d2v2scale.report:entry",
        "d2v2scale-convert = d2v2scale.convert:entry",
        "d2v2scale-features = d2v2scale.features:entry",
        "d2v2scale-prepare = d2v2scale.prepare:entry",
        "d2v2scale-doctor = d2v2scale.doctor:entry",
    ]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[  # every runtime import but torch and DeepSpeed (see above)
        "pyyaml",
        "numpy",
        "nvidia-ml-py",
        "matplotlib",
        "tqdm",
        "pillow",  # image decoding without DALI, and the image checks
        "soundfile",  # audio decoding without DALI
        "scikit-learn",  # the digits data of the tiny presets and make demo
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "dali-cuda13": ["nvidia-dali-cuda130"],
        "fairseq": ["omegaconf"],  # reading released fairseq checkpoints (--trust_checkpoint)
        "tensorboard": ["tensorboard"],  # ds_config "tensorboard" sink
        "wandb": ["wandb"],  # ds_config "wandb" sink (offline unless WANDB_MODE says otherwise)
        "test": ["pytest", "omegaconf", "tensorboard"],
    },
)
