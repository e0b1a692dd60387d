"""Parallelism applied from outside the model: tensor.py, fsdp.py, context.py; parallelize.py orders them."""
