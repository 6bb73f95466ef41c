"""A small digits classifier: its penultimate features define a Frechet distance on digits (FID)
and its predictions the class accuracy of conditional samples (does the sample match its prompt).

    .venv/bin/python -m tdm_train.demos.digits.classifier   # retrains and rewrites weights/classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ... import atomic
from .data import load_digits_tensors

CLASSIFIER_FILE = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"


class DigitsClassifier(nn.Module):
    def __init__(self, features: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def load_classifier(path: Path = CLASSIFIER_FILE) -> DigitsClassifier:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: run python -m tdm_train.demos.digits.classifier")
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(CLASSIFIER_FILE))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_tensors()
    order = torch.randperm(images.shape[0], generator=gen)
    held_out, train_idx = order[:300], order[300:]
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        model.train()
        for batch in train_idx[torch.randperm(len(train_idx), generator=gen)].split(64):
            x = images[batch] + 0.05 * torch.randn(images[batch].shape, generator=gen)  # light noise robustness
            loss = nn.functional.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    print(f"held-out accuracy {accuracy:.4f} on {len(held_out)} images")
    output = Path(args.output)
    atomic.save_safetensors(model.state_dict(), output,
                            {"held_out_accuracy": f"{accuracy:.4f}", "training": json.dumps(vars(args))})
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
