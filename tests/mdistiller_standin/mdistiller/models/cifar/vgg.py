"""CIFAR VGGs with BN (``block0..block4``, ``classifier``), upstream's ``cifar/vgg.py`` layout."""
import torch.nn as nn
import torch.nn.functional as F

CFG = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_layers(cfg, in_channels):
    layers = []
    for v in cfg:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg, num_classes=1000):
        super().__init__()
        self.block0 = _make_layers(cfg[0], 3)
        self.block1 = _make_layers(cfg[1], cfg[0][-1])
        self.block2 = _make_layers(cfg[2], cfg[1][-1])
        self.block3 = _make_layers(cfg[3], cfg[2][-1])
        self.block4 = _make_layers(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        f0 = x
        x = self.pool0(x)
        x = self.block1(x)
        f1_pre = x
        x = F.relu(x)
        f1 = x
        x = self.pool1(x)
        x = self.block2(x)
        f2_pre = x
        x = F.relu(x)
        f2 = x
        x = self.pool2(x)
        x = self.block3(x)
        f3_pre = x
        x = F.relu(x)
        f3 = x
        if h == 64:
            x = self.pool3(x)
        x = self.block4(x)
        f4_pre = x
        x = F.relu(x)
        f4 = x
        x = self.pool4(x)
        x = x.reshape(x.size(0), -1)
        f5 = x
        x = self.classifier(x)
        return x, {"feats": [f0, f1, f2, f3, f4], "preact_feats": [f0, f1_pre, f2_pre, f3_pre, f4_pre],
                   "pooled_feat": f5}


def vgg8_bn(**kw): return VGG(CFG["S"], **kw)
def vgg11_bn(**kw): return VGG(CFG["A"], **kw)
def vgg13_bn(**kw): return VGG(CFG["B"], **kw)
def vgg16_bn(**kw): return VGG(CFG["D"], **kw)
def vgg19_bn(**kw): return VGG(CFG["E"], **kw)
