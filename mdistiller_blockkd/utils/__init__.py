"""The bottom layer: utilities that import nothing of the package above them.

* :mod:`.fileio` -- atomic writes, the JSON-lines reader, the run-folder lock (torch-free);
* :mod:`.checkpoint` -- the one checkpoint reader (``weights_only=True``) and atomic saves;
* :mod:`.dist` -- ``torchrun`` / process-group helpers;
* :mod:`.misc` -- meters, accuracy, seeds, RNG snapshots, appended log lines.

With :mod:`mdistiller_blockkd.errors`, :mod:`mdistiller_blockkd.registry` and
:mod:`mdistiller_blockkd.config` they form layer 0; models, data and distillers stand on
it, then the assembler (:mod:`mdistiller_blockkd.engine.build`), the trainer
(:mod:`mdistiller_blockkd.engine.trainer`) and the commands (:mod:`mdistiller_blockkd.cli`).
``tests/test_layers.py`` enforces the order.
"""
