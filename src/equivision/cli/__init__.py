"""The ``equivision`` command line, one module per command group.

* :mod:`.measure` (``measure``), :mod:`.train` (``train``), :mod:`.demo` (``demo``,
  ``list``), :mod:`.gcnn` (``exactness``), :mod:`.robust` (``attack``, ``defend``),
  :mod:`.ssl` (``pretrain``, ``probe``): each has ``add_parsers(sub)`` and its
  ``cmd_*`` functions;
* :mod:`.common`: the shared parts (``CLIError``, argument types, model loading,
  ``distributed_session``);
* :mod:`.main`: ``make_parser`` and ``main``.

Run as ``equivision ...``, ``python -m equivision ...`` or ``python -m equivision.cli
...`` (the form ``torchrun`` takes).
"""

from .common import CLIError, distributed_session, parse_kwargs
from .main import main, make_parser

__all__ = ["CLIError", "distributed_session", "main", "make_parser", "parse_kwargs"]
