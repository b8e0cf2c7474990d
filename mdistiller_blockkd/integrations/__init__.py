"""Bridges to other knowledge-distillation toolboxes.

* :mod:`mdistiller_blockkd.plugin`: Block-KD inside upstream mdistiller.
* :mod:`mdistiller_blockkd.integrations.torchdistill`: Block-KD and DKD inside
  torchdistill (``pip install "mdistiller_blockkd[torchdistill]"``); importing it
  registers them in torchdistill's registries.
"""
