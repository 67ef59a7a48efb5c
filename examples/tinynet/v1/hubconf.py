"""tinynet v1: a small image classifier published as a PyTorch Hub repo."""

dependencies = ["torch"]

from model.net import TinyNet  # noqa: E402


def tinynet(pretrained=False, num_classes=10):
    """TinyNet v1: conv(3→16) + ReLU + global pool + linear head.

    pretrained (bool): use the published weights (here: a fixed, seeded initialisation).
    num_classes (int): size of the output layer.
    """
    return TinyNet(width=16, num_classes=num_classes, pretrained=pretrained)
