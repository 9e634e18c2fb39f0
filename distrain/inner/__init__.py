"""Where a step happens: the inner schedules of a worker (single, ddp, deepspeed, pipeline, sp).

``schedule.InnerSchedule`` is the one base (step counter, AdamW and its learning-rate schedule,
the step report with its timing, ``seek``, ``state_dict``); ``build.build_schedule`` is the one
place that decides which schedule a worker runs.
"""
