"""The one place the built-in plugins register themselves: importing a module registers what it
defines. Pipeline sources (`model.source`), rewards (`reward.weights`) and prompt sets
(`prompts.train`, `eval.sets`) are looked up in their registries (`pipelines/base.py`,
`rewards/registry.py`, `prompts/registry.py`) by the modules that build them, which import this
one; a new plugin adds one import here.
"""
# Pipeline sources.
from prdp_jax.pipelines import pixel, sd  # noqa: F401
from prdp_jax.world import pipeline  # noqa: F401
# Rewards.
from prdp_jax.rewards import aesthetic, brightness, clipscore, hpsv2, jpeg, pickscore  # noqa: F401
from prdp_jax.world import alignment, preference, quality  # noqa: F401
# Prompt sets (the registry's own: animals, animal_names).
from prdp_jax.world import prompts  # noqa: F401
