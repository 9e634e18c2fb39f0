"""The worker: the owner of one parameter set (a whole model or one stage), built the same way in every mode.

``worker.Worker`` runs a round (inner steps, then the outer round of every owned segment);
``stage`` is what it holds, seen in the ordinary parameterisation; ``compressed`` the pieces a
compressed pipeline replica needs to share a round with full replicas; ``frames`` the global
weights as wire frames; ``build.build_worker`` the one way to build one.
"""
