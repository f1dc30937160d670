"""The plan: one parallel layout (:mod:`.plan`), shared by the simulator, the planner and the executor;
its columnar codec for batched scoring (:mod:`.codec`) and its text forms (:mod:`.text`). Pure: no torch."""
