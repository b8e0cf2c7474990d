"""ImageNet ResNets: torchvision's layout and weights keys, with upstream's ``(logits, feats)`` forward."""
import torch
from torchvision.models import resnet as tv


class ResNet(tv.ResNet):
    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        stem = x
        x = self.maxpool(x)
        feats = [stem]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        avg = torch.flatten(self.avgpool(x), 1)
        return self.fc(avg), {"feats": feats, "preact_feats": feats, "pooled_feat": avg}


def resnet18(num_classes=1000): return ResNet(tv.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
def resnet34(num_classes=1000): return ResNet(tv.BasicBlock, [3, 4, 6, 3], num_classes=num_classes)
def resnet50(num_classes=1000): return ResNet(tv.Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
