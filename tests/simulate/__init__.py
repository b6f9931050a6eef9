"""Tests of the simulator (:mod:`spndi_dask.simulate`)."""

#: Preset overrides without detector or beam noise sources (background, hot and dead pixels,
#: drift, monitor noise and decay): what is left is the diffraction and its counting statistics.
CLEAN_PHYSICS = dict(
    background=0.0,
    hot_fraction=0.0,
    dead_fraction=0.0,
    drift_step_px=0.0,
    monitor_noise=0.0,
    monitor_decay=0.0,
)
