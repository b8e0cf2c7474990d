"""Upstream's distiller table and base class (the contract the plugin fills in)."""
import torch.nn.functional as F
from torch import nn


class Distiller(nn.Module):
    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        self.teacher = teacher

    def train(self, mode=True):
        self.training = mode
        for module in self.children():
            module.train(mode)
        self.teacher.eval()
        return self

    def get_learnable_parameters(self):
        return [v for k, v in self.student.named_parameters()]

    def forward_test(self, image):
        return self.student(image)[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])


class Vanilla(nn.Module):
    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward_train(self, image, target, **kwargs):
        logits, _ = self.student(image)
        return logits, {"ce": F.cross_entropy(logits, target)}

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.student(kwargs["image"])[0]


distiller_dict = {"NONE": Vanilla}
