"""hpcsgd: MPI-native data-parallel PyTorch training with RI-SGD and RPS.

Importing the package has no side effects: no communicator is created, no RNG is seeded.
"""

__version__ = "0.1.0"
