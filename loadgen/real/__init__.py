"""Real-execution benchmarks: the same multi-tenant workload run on the FlowMesh fabric,
on isolated per-tenant fabrics (the published baseline) and as Ray tasks, side by side;
and the fabric's per-operator overhead against raw JetStream and Ray."""
