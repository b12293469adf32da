"""A plain PyTorch training script, written the way people write them (no compress anywhere).

    python plain_train.py IMAGE_FOLDER OUT.pt

Reads IMAGE_FOLDER/{train,test}/<class>/*.jpg with Pillow; preprocesses like torchvision's ImageNet
recipe (Resize(73) + CenterCrop(64), ToTensor, Normalize(ImageNet mean/std)); trains TinyNet for one
epoch; saves a checkpoint dict {"model": state_dict of the DataParallel-wrapped net, "epoch": 1} with
torch.save; prints {"test_accuracy": ...} (top-1 %, on the test images, same preprocessing) as JSON.
tests/test_import_e2e.py imports that file into a compress pipeline and expects the same accuracy.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

RESIZE, CROP = 73, 64
MEAN, STD = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])


class TinyNet(nn.Module):
    def __init__(self, num_classes=3, in_channels=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def load(path):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = (RESIZE, int(RESIZE * h / w)) if w <= h else (int(RESIZE * w / h), RESIZE)
    img = img.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - CROP) / 2.0)), int(round((size[1] - CROP) / 2.0))
    a = np.asarray(img.crop((left, top, left + CROP, top + CROP)), dtype=np.float32) / 255
    return torch.from_numpy(((a - MEAN) / STD).transpose(2, 0, 1).copy())


def split(root, name, classes):
    items = [(p, k) for k, c in enumerate(classes) for p in sorted((root / name / c).glob("*.jpg"))]
    return torch.stack([load(p) for p, _ in items]), torch.tensor([k for _, k in items])


def main():
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    x, y = split(root, "train", classes)
    net = nn.DataParallel(TinyNet(len(classes)))  # saved keys get DataParallel's "module." prefix
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    for idx in torch.randperm(len(y)).split(8):   # one epoch
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    net.eval()
    tx, ty = split(root, "test", classes)
    with torch.no_grad():
        accuracy = (net(tx).argmax(1) == ty).float().mean().item() * 100
    torch.save({"model": net.state_dict(), "epoch": 1}, out)
    print(json.dumps({"test_accuracy": accuracy, "test_images": len(ty)}))


if __name__ == "__main__":
    main()
