"""The Trellis coordinator: owns workflow state and leases tasks to workers over gRPC."""
