"""How a FlowMesh process is configured: the one settings object (`settings`: flags >
environment > file) and the credentials files `flowmesh auth init` writes (`creds`)."""
