"""Supervision: vllm-mlx-up, the lifeline that ends its children with it, health checks."""
