"""Recipes: jobs that train or evaluate models, above ``training`` and ``algorithms``.

``world_pretrain`` builds and trains the embedded world's base model (``diffalign pretrain``), ``world_eval`` is
the world's held-out benchmark command (``diffalign eval``), ``world_benchmark`` samples and judges a model on
world prompts, and ``reward_commands`` wires ``diffalign score`` and ``diffalign train-reward``.
``diffalign.world`` itself (scene, renderer, prompts, evaluator) imports nothing of the rest.
"""
