"""tinynet v2: a small image classifier published as a PyTorch Hub repo."""

dependencies = ["torch"]

from model.net import TinyNet  # noqa: E402


def tinynet(pretrained=False, num_classes=10, dropout=0.0):
    """TinyNet v2: two convs (3→24→24) + GELU + global pool + dropout + linear head.

    pretrained (bool): use the published weights (here: a fixed, seeded initialisation).
    num_classes (int): size of the output layer.
    dropout (float): dropout before the head (new in v2).
    """
    return TinyNet(width=24, num_classes=num_classes, dropout=dropout, pretrained=pretrained)
