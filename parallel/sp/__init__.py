"""Adaptive sequence parallelism, all of it: the cost model (``cost``), the planner (``planner``,
``milp``, ``bounds``), plans and their broadcast (``plan``), the step (``step``, ``ulysses``) and
profiling the cost model (``profile``)."""
