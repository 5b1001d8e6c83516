"""metabp: meta-learning by backpropagation, the reference code of the book.

The bilevel loop lives in :mod:`metabp.bilevel` (written from scratch with
``torch.func``) and again in :mod:`metabp.faces` (written with learn2learn, higher
and TorchOpt).
Tasks, models, training, evaluation and plots have modules of their own.
"""

__version__ = "0.1.0"
