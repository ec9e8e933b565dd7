"""AlexNet (Krizhevsky et al. 2012), the paper's second backbone, written in plain torch (no torchvision
here). The layer layout and names are torchvision's `alexnet` (`features.*`, `classifier.*`) with a
`num_classes`-way last layer (7 for PACS, 65 for Office-Home, 5 for VLCS). No pretrained weights can be
downloaded on the development machines, so it is trained from scratch (random init, seeded by the run).

`AlexNetProcessor` turns a PIL image into the network's input: RGB, shortest side resized to
`image_size` (bilinear), centre crop, ImageNet mean/std. It has the call signature of transformers'
image processors (`processor(images=image, return_tensors="pt")["pixel_values"]`), so extract's
`PreprocessedImages` opens and preprocesses the images for both backbones.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_IMAGE_SIZE = 63  # the smallest input whose feature map survives AlexNet's three 3x3/2 max-pools


class AlexNet(nn.Module):
    """torchvision's AlexNet: 5 conv layers, adaptive 6x6 average pool, 3 fully connected layers."""

    def __init__(self, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class AlexNetProcessor:
    """PIL image -> normalised [1, 3, S, S] tensor (a picklable callable for DataLoader workers)."""

    def __init__(self, image_size: int = 224):
        self.image_size = int(image_size)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, images, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        image = to_rgb(images)
        s = self.image_size
        w, h = image.size
        scale = s / min(w, h)
        image = image.resize((max(s, round(w * scale)), max(s, round(h * scale))), resample=2)  # bilinear
        w, h = image.size
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return {"pixel_values": ((x - self.mean) / self.std).unsqueeze(0)}


def to_rgb(image):
    """extract's conversion to 8-bit RGB when it is there (EXIF, alpha on white, high bit depth), else PIL's."""
    try:
        from extract.images import to_rgb as convert
    except ImportError:  # pragma: no cover - older extract
        return image if image.mode == "RGB" else image.convert("RGB")
    return convert(image)


class AlexNetClassifier(AlexNet):
    """The federated model for `backbone=alexnet`: AlexNet and its class head, cross-entropy (state dict
    keys as torchvision's: `features.0.weight`, ..., `classifier.6.bias`)."""

    backbone = "alexnet"

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(pixels).float(), labels)

    def prepare_eval(self) -> None:
        pass

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        return self(pixels).argmax(1)
