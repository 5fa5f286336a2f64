"""Text-to-image pipelines: the shared `Pipeline` type and its registry of sources (`base.py`),
a pixel-space model from a fresh init (`pixel.py`), Stable Diffusion folders (`sd.py`); the
world registers its own (`world/pipeline.py`). `factory.build_pipeline` builds the one a config names."""
