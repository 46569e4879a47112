"""Recipes on the embedded world: what trains or evaluates a model there, above ``training`` and ``algorithms``.

``world_pretrain`` builds and trains the world's base model (``diffalign pretrain``), ``world_eval`` is the
held-out benchmark command (``diffalign eval``) and ``world_benchmark`` samples and judges a model on world
prompts. ``diffalign.world`` itself (scene, renderer, prompts, evaluator) imports nothing of the rest.
"""
