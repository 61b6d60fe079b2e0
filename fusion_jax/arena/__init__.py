"""The fusion arena: every fusion method of the project on the same demo specialists, evaluated the same
way, in one table. It runs every method wing, so it sits above them (below the entry points).

- :mod:`.contestants`: the registry (a wing joins with ``fn(ctx) -> Entry``; missing wings are listed);
- :mod:`.builtin`: base, specialists, the multi-task baseline, weight merges, UltraFuser;
- :mod:`.evaluate`: eval loss per domain, math accuracy, code pass@1;
- :mod:`.pipeline`: ``run(config)``; :mod:`.report`: the table and the plot; :mod:`.config`: presets.
"""
