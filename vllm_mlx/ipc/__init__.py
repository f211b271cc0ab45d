"""What crosses between processes besides the proto's messages: tensors in
shared memory, gRPC servers with health and reflection, and the ErrorInfo
that failed calls carry."""
