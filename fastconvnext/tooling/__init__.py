"""Tooling: what designs, checks and measures the kernels, never what a forward or backward pass runs.

- `roofline`: analytic byte/FLOP bounds, the machine constants with their public sources, the eager floor and
  the eager estimate;
- `sass_report`: the static SASS model (compiles each launch for sm_80/sm_90, no GPU) that writes the prior
  (fastconvnext/prior.json) and the per-launch table (tooling/launches.json);
- `mlp_paths`: the MLP's launch-path choices costed on that model, to check the rules the kernels state;
- `compile_check`: every kernel config compiled for real GPU targets, spills and tensor cores checked;
- `calibrate`: measures the model's machine constants on a GPU;
- `bench`: the harness behind `fastconvnext bench`.

Nothing under fastconvnext.kernels, fastconvnext.backend, the modules or the tuning imports this package
(tests/test_tooling_wall.py).
"""
