"""ResNet-50 as TorchServe's stock eager loader wants it: one ``nn.Module`` class built with no arguments.

``--model-file`` for ``torch-model-archiver``; the weights come as a state_dict (``--serialized-file``).
"""

from torchvision.models.resnet import Bottleneck, ResNet


class ResNet50(ResNet):
    """torchvision's ResNet-50 (1000 classes), constructible without arguments."""

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
