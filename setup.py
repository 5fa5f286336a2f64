"""prdp-jax: Proximal Reward Difference Prediction finetuning of diffusion models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="prdp-jax",
    version="0.1.0",
    description="PRDP (and DDPO) reward finetuning of text-to-image diffusion models in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["prdp_jax", "prdp_jax.*"]),
    # The embedded world's pretrained base (a diffusers-style folder with its manifest).
    package_data={"prdp_jax.world": ["base_model/*.json", "base_model/*/*"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "chex==0.1.92",
        "ml-collections==1.1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "safetensors>=0.4",
        "scipy>=1.11",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "ml_dtypes>=0.4",          # bf16 tensors in safetensors files (also a jax dependency)
        "transformers>=4.38",      # CLIPTokenizer of Stable Diffusion folders (no torch needed)
    ],
    extras_require={
        # PyTorch references for numerical parity tests (the trainer imports torch only to read
        # .bin/.pt/.pth weights); pyarrow reads parquet prompt files (Pick-a-Pic); matplotlib
        # draws the experiments' plots; pytest-xdist runs the suite on two workers (`-n 2`).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "torch==2.13.0", "diffusers==0.42.1",
                 "transformers==5.24.0", "pyarrow>=15", "matplotlib>=3.8", "ftfy>=6.1"],
        # ftfy: open_clip's text cleaning for HPSv2 prompts (without it, rare characters differ).
        "rewards": ["ftfy>=6.1"],
        # matplotlib: the plots of `python -m prdp_jax.experiments`.
        "experiments": ["matplotlib>=3.8"],
    },
)
