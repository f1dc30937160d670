"""The simulator and the planner (pure numpy): constants (:mod:`.constants`), what a prediction holds
(:mod:`.estimate`), FLOPs and MFU (:mod:`.flops`), memory (:mod:`.memory`) and step time
(:mod:`.step_time`) models, :mod:`.simulator`, :mod:`.planner` and the planner's :mod:`.report`."""
