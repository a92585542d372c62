"""What the network and machines do wrong: drop masks, link rules, network emulation.

A layer the comm layer consults (numpy and the standard library; MPI only where the emulated
network agrees on a clock). Nothing is imported here.
"""
