"""loadgen: workload generation, the simulator (loadgen.sim: FlowMesh's real scheduling
policy against isolated and shared-FIFO baselines on emulated fleets) and benchmarks.
CLI: `loadgen sim | sweep | bench-scheduler | bench-sim` (loadgen/README.md)."""
