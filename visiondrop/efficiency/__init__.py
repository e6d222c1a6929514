"""Efficiency tools: the FLOPs count that reproduces the paper's convention (`flops`) and the latency/memory
benchmark (`latency`, `make table2`)."""
