"""A hand-written PyTorch loop with a polytask Engine: Nash-MTL on UCI Adult.

    python examples/plain_loop.py [--epochs 2]

The engine is made once and kept: it owns the method's state, the step counter and the random
stream, so the loop stays an ordinary PyTorch loop.
"""

from __future__ import annotations

import argparse

import torch

import polytask as pt


def main(epochs: int = 2, method: str = "nash_mtl", batch_size: int = 256) -> dict[str, float]:
    torch.manual_seed(0)
    data = pt.datasets.load("adult")
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=data.input_shape[0], hidden=[128, 64]), data.tasks)
    engine = pt.Engine(method, model.shared_parameters(), last_shared_params=model.last_shared_parameters(),
                       params=model.parameters())  # the heads: found without walking the graph each step
    optimizer = torch.optim.Adam([*model.parameters(), *engine.parameters()], lr=1e-3)
    tasks = {t.name: t for t in data.tasks}
    loader = torch.utils.data.DataLoader(torch.arange(len(data.train)), batch_size=batch_size, shuffle=True)
    for epoch in range(epochs):
        for rows in loader:
            batch = data.train.subset(rows)
            out = model(batch.x)
            losses = {name: task.loss(out[name], batch.targets[name]) for name, task in tasks.items()}
            optimizer.zero_grad()
            report = engine.backward(losses)  # d = Σ wᵢ ∇Lᵢ in .grad; report.weights by task
            optimizer.step()
        print(f"epoch {epoch + 1}: weights {({t: round(w, 3) for t, w in report.weights.items()})}")
    model.eval()
    with torch.no_grad():
        out = model(data.test.x)
    accuracy = {name: float(((out[name] > 0).float() == data.test.targets[name]).float().mean()) for name in tasks}
    print("test accuracy", {t: round(a, 4) for t, a in accuracy.items()})
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--method", default="nash_mtl")
    main(**vars(parser.parse_args()))
