"""The simulator and the planner (pure numpy): what a prediction holds and the constants it uses
(:mod:`.estimate`), the DeepSpeed settings of each plan read from the config the worker runs
(:mod:`.deepspeed_settings`), FLOPs and MFU (:mod:`.flops`), memory (:mod:`.memory`) and step time
(:mod:`.step_time`) models, :mod:`.simulator`, :mod:`.planner` and the planner's :mod:`.report`."""
