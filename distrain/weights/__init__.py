"""The model's weights outside a run: a run's global weights read from its checkpoints, the Hugging
Face LLaMA directory they are exported to, and what ``model.init_from`` starts a run from.

``source`` and what it uses (``hf``, ``run``, ``shapes``) import neither the configuration nor the
model — model settings travel as plain fields — so the configuration's load-time check of
``model.init_from`` reads a directory's shapes without an import cycle. ``export`` (the command's
work) reads the run's tokenizer through ``distrain.data``.
"""
