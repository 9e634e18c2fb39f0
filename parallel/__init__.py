"""Parallelism as plain functions over a duck-typed model: pipeline stages and their boundaries
(``pipeline``), adaptive sequence parallelism (``sp``), chunk-wise optimisation (``chunkwise``).
Imports ``distrain.comm`` only, never the trainer or a launcher."""
