"""workers: the data plane. Stateless worker runtime and the operator executors."""
