"""AlexNet as the paper's authors ran it in their federated toolkit (microsoft/PersonalizedFL,
`network/models.py`, `datautil/prepare_data.py`, `alg/fedavg.py`), written here in plain torch (no
torchvision): AlexNet's five conv layers and three fully connected layers with a BatchNorm after every
conv layer and after the first two fully connected ones, no dropout, a `num_classes`-way last layer (7
for PACS, 65 for Office-Home, 5 for VLCS). The state dict keys are the toolkit's (`features.conv1.weight`,
`features.bn1.running_mean`, ..., `classifier.fc3.bias`), so a checkpoint of one loads into the other.
No pretrained weights: the toolkit trains from scratch too (random init, seeded by the run).

The inputs are the toolkit's (`gettransforms`): the image resized to `image_size` x `image_size` (256,
bilinear, aspect ratio not kept), no crop, pixels in [0, 1] with no mean/std normalisation; training
images are also flipped horizontally with probability 0.5 and then rotated by an angle uniform in
[-30, 30] degrees (nearest neighbour, black corners). `AlexNetProcessor` has the call signature of
transformers' image processors (`processor(images=image, return_tensors="pt")["pixel_values"]`), so
extract's `PreprocessedImages` opens and preprocesses the images; `processor.augmented(seed)` is the
training transform with its random draws seeded (reproducible whatever the DataLoader's workers).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

MIN_IMAGE_SIZE = 63  # the smallest input whose feature map survives AlexNet's three 3x3/2 max-pools
MAX_ROTATION = 30.0  # degrees, both ways
# (out channels, kernel, stride, padding, max-pool after) of the five conv layers
CONV_LAYERS = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (256, 3, 1, 1, False),
               (256, 3, 1, 1, True))
HIDDEN = 4096


class AlexNet(nn.Module):
    """conv-BN-ReLU (x5, three max-pools), adaptive 6x6 average pool, fc-BN-ReLU (x2), fc."""

    def __init__(self, num_classes: int):
        super().__init__()
        layers, channels = OrderedDict(), 3
        for n, (out, kernel, stride, padding, pool) in enumerate(CONV_LAYERS, 1):
            layers[f"conv{n}"] = nn.Conv2d(channels, out, kernel_size=kernel, stride=stride, padding=padding)
            layers[f"bn{n}"] = nn.BatchNorm2d(out)
            layers[f"relu{n}"] = nn.ReLU(inplace=True)
            if pool:
                layers[f"maxpool{n}"] = nn.MaxPool2d(kernel_size=3, stride=2)
            channels = out
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        head, width = OrderedDict(), channels * 6 * 6
        for n in (1, 2):
            head[f"fc{n}"] = nn.Linear(width, HIDDEN)
            head[f"bn{n + 5}"] = nn.BatchNorm1d(HIDDEN)
            head[f"relu{n + 5}"] = nn.ReLU(inplace=True)
            width = HIDDEN
        head["fc3"] = nn.Linear(width, num_classes)
        self.classifier = nn.Sequential(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class AlexNetProcessor:
    """PIL image -> [1, 3, S, S] tensor in [0, 1] (a picklable callable for DataLoader workers): the
    toolkit's evaluation transform, or its training transform when made by `augmented(seed)`."""

    def __init__(self, image_size: int = 256, seed: int | None = None):
        self.image_size, self.seed = int(image_size), seed

    def augmented(self, seed: int) -> "AlexNetProcessor":
        """The training transform, its flip and angle drawn from `seed`."""
        return AlexNetProcessor(self.image_size, seed)

    def __call__(self, images, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        image = to_rgb(images).resize((self.image_size, self.image_size), resample=Image.BILINEAR)
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed)
            if torch.rand(1, generator=generator).item() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            angle = torch.empty(1).uniform_(-MAX_ROTATION, MAX_ROTATION, generator=generator).item()
            image = image.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=(0, 0, 0))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return {"pixel_values": x.unsqueeze(0)}


def to_rgb(image):
    """extract's conversion to 8-bit RGB when it is there (EXIF, alpha on white, high bit depth), else PIL's."""
    try:
        from extract.images import to_rgb as convert
    except ImportError:  # pragma: no cover - older extract
        return image if image.mode == "RGB" else image.convert("RGB")
    return convert(image)


class AlexNetClassifier(AlexNet):
    """The federated model for `backbone=alexnet`: AlexNet and its class head, cross-entropy."""

    backbone = "alexnet"

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(pixels).float(), labels)

    def prepare_eval(self) -> None:
        pass

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        return self(pixels).argmax(1)
