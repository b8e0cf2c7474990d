"""mdistiller_blockkd: a knowledge-distillation toolbox built around Block-KD.

Block-KD (block-wise logit distillation) splices the student's first blocks onto the
teacher's remaining blocks ("stepping stones") and distils through their logits.
The package also carries an mdistiller-compatible host: config, CIFAR model zoo,
data, one trainer, and the KD / DKD / ReviewKD baselines.
"""

__version__ = "0.1.0"
