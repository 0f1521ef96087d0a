"""Data steps: one verb per module, each a plain function that Prefect tasks wrap thinly.
No Prefect here: the steps and the run's scheduler run and test without an orchestrator."""
