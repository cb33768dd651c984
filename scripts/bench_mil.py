"""MIL throughput on the CPU: bags/s of training steps and of whole-bag inference, for bags
of ``--tiles`` tiles of ``--dim``-dimensional features (UNI-sized: 10k × 1024), beside the
time of one pass over the bag through the embedding alone (the model's floor), and the
process's peak resident memory.

    .venv/bin/python scripts/bench_mil.py --tiles 10000 --dim 1024 --bags 20
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from cscvision.models.mil_net import TRAINED
from cscvision.training.mil import (
    BagTargets,
    MILConfig,
    MILSystem,
    make_mil_net,
)


def bench(arch: str, bags: list[torch.Tensor], args: argparse.Namespace) -> None:
    """Training steps (the Lightning system's own loss, CLAM's instance loss included) and
    whole-bag inference of one architecture."""
    targets = BagTargets(np.zeros((1, 2)), np.zeros((1, 1), np.int64), (3,))
    net = make_mil_net(MILConfig(architecture=arch), args.dim, targets)
    system = MILSystem(net)
    system.log = lambda *a, **k: None  # no Trainer attached: nothing to log to
    opt = system.configure_optimizers()
    labels = {"reg": torch.zeros(2), "cls": torch.zeros(1, dtype=torch.long), "cov": torch.zeros(0)}

    def train_step(x: torch.Tensor) -> None:
        pick = torch.randperm(len(x))[: args.max_bag]
        loss = system.training_step({"x": x[pick], **labels}, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def timed(fn, n: int) -> float:
        fn(bags[0])  # warm-up
        start = time.perf_counter()
        for i in range(n):
            fn(bags[i % len(bags)])
        return n / (time.perf_counter() - start)

    net.train()
    train_rate = timed(train_step, args.bags)
    net.eval()
    with torch.inference_mode():
        infer_rate = timed(lambda x: net(x), args.bags)
        embed_rate = timed(lambda x: net.embed(x), args.bags)
    print(f"{arch}:")
    print(f"  training  {train_rate:7.1f} bags/s  ({args.max_bag} tiles sampled per bag)")
    print(f"  inference {infer_rate:7.1f} bags/s  (whole bags)")
    print(
        f"  embedding alone {embed_rate:7.1f} bags/s (floor): inference at "
        f"{infer_rate / embed_rate:.2f} of it"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--bags", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-bag", type=int, default=4096, help="tiles sampled per training step")
    ap.add_argument("--architecture", choices=(*TRAINED, "all"), default="all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    bags = [torch.as_tensor(rng.normal(0, 1, (args.tiles, args.dim)).astype(np.float32))
            for _ in range(4)]  # fmt: skip
    print(f"bags of {args.tiles} tiles x {args.dim} features, {args.threads} thread(s)")
    for arch in TRAINED if args.architecture == "all" else (args.architecture,):
        bench(arch, bags, args)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
