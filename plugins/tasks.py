"""The built-in tasks plugin: registers the group word problem (``group``, ``s5``), associative recall
(``mqar``) and byte LM (``lm``).

This module is the plugin (listed in :data:`psmsearch.registry.DEFAULT_PLUGINS`): the registry names
a task's plugin by the module whose ``register_tasks`` hook registered it, so every task here is
recorded as ``psmsearch.plugins.tasks`` (the MLflow tag ``psmsearch.plugin.task``, ``psmsearch
plugins``) wherever its class is defined. The tasks live in helper modules that are not plugins:

- :mod:`psmsearch.plugins.group_words`: the group tables and :class:`GroupWordProblem`, :class:`S5WordProblem`;
- :mod:`psmsearch.plugins.mqar`: :class:`MQAR`;
- :mod:`psmsearch.plugins.disjoint_sampling`: how the synthetic tasks keep training, validation and
  test sequences disjoint (by content hash, with held-out sets seeded by ``eval_seed``);
- :mod:`psmsearch.plugins.byte_lm`: :class:`ByteLM`, which splits its text by byte offset, reading it
  through :mod:`psmsearch.plugins.text_files` (local files) or :mod:`psmsearch.plugins.hf_text`
  (Hugging Face datasets).

The names below are re-exported for code that imports them from here. A test that patches a helper
must patch it in the module that defines it: patching a re-export here changes nothing the tasks see.
"""

from __future__ import annotations

from typing import Callable

from psmsearch import hookimpl
from psmsearch.plugins import hf_text
from psmsearch.plugins.byte_lm import ByteLM
from psmsearch.plugins.group_words import GroupWordProblem, S5WordProblem, group_elements, multiplication_table
from psmsearch.plugins.mqar import MQAR

_load_hf_text = hf_text.load_hf_text  # its name here before the split; tests import it from this module


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    """Register the built-in tasks, in the order ``psmsearch plugins`` lists them."""
    register(GroupWordProblem)
    register(S5WordProblem)
    register(MQAR)
    register(ByteLM)


__all__ = ["ByteLM", "GroupWordProblem", "MQAR", "S5WordProblem", "group_elements", "multiplication_table"]
