"""What a FlowMesh process reports: structured logs (`logs`, structlog) and the Prometheus
exporter (`exporter`)."""
