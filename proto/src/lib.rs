//! The `flotilla.agent.v1` gRPC API between the operator and the node agents.
