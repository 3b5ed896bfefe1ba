"""The paper's experiments as data and what runs and reports them: MTIL and class-incremental presets (`presets`),
their official recipes (`recipes`), the check of everything a run downloads (`data_check`), experiments over methods
(`experiment`), metrics, reports and figures. Scripts that use them live in the top-level `benchmarks/` folder."""
