"""What crosses between processes besides the proto: tensors in shared memory,
and gRPC servers with health and reflection."""
