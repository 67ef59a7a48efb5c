import torch.nn as nn
from utils import seeded_init


class TinyNet(nn.Module):
    version = "v2"

    def __init__(self, width=24, num_classes=10, dropout=0.0, pretrained=False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)
        if pretrained:
            seeded_init(self, seed=1)

    def forward(self, x):
        return self.head(self.dropout(self.features(x).flatten(1)))
