"""The job configuration: the typed schema (:mod:`.schema`), loading YAML and overrides into it
(:mod:`.loader`), and the model (:mod:`.models`) and cluster (:mod:`.clusters`) presets. Pure: no torch."""
