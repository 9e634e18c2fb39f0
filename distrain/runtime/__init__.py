"""The runtime of every launch mode: one RoundLoop over a pool of workers.

``loop`` (the rounds, evaluation, checkpoints, catch-up, resume), ``records`` (metrics and the
summary), ``common`` (data, run directory, checkpoints per rank, fault specs), and one pool per
mode: ``simulation`` (threads over the simulated transport), ``torchrun`` (one process per
worker), ``ray`` (one actor per worker, a Coordinator actor). Launchers in ``launch/`` only parse
arguments and start processes.
"""
