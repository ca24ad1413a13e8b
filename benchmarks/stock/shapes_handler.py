"""TorchServe's stock ``ImageClassifier`` with only its ``image_processing`` class attribute replaced.

The stock transform is ImageNet's (resize 256, centre crop 224, ImageNet mean/std); the demo model is
trained at 128x128 with mean = std = 0.5, so the shapes benchmark swaps in that transform (a whole-image
resize, as lafam-serve does) and keeps every other line of the stock handler. ResNet-50 uses the
unmodified ``image_classifier``.
"""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class ShapesClassifier(ImageClassifier):
    """Stock image classifier at the demo model's input size and normalisation."""

    image_processing = transforms.Compose(
        [
            transforms.Resize((128, 128)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )
