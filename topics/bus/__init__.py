"""The buses that carry the contract's streams: NATS JetStream (`nats.Bus`, the default),
Kafka (`kafka`), the seam both satisfy (`transport`), and a bounded reachability check
(`reach`)."""
