"""The FlowMesh simulator: a discrete-event run of workloads under the real scheduling
policy (engine.scheduler.policy.Policy) and two baselines. See loadgen/README.md."""
