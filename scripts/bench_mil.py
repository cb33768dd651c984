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

from cscvision.training.mil import GatedAttentionMIL, MILSystem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--bags", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-bag", type=int, default=4096, help="tiles sampled per training step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    bags = [torch.as_tensor(rng.normal(0, 1, (args.tiles, args.dim)).astype(np.float32))
            for _ in range(4)]  # fmt: skip
    net = GatedAttentionMIL(args.dim, n_regression=2, n_classes=(3,))
    system = MILSystem(net)
    opt = system.configure_optimizers()
    target = torch.zeros(2)

    def train_step(x: torch.Tensor) -> None:
        pick = torch.randperm(len(x))[: args.max_bag]
        reg, logits, _ = net(x[pick])
        loss = ((reg - target) ** 2).mean() + torch.nn.functional.cross_entropy(
            logits[0][None], torch.zeros(1, dtype=torch.long)
        )
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
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"bags of {args.tiles} tiles x {args.dim} features, {args.threads} thread(s)")
    print(f"training  {train_rate:7.1f} bags/s  ({args.max_bag} tiles sampled per bag)")
    print(f"inference {infer_rate:7.1f} bags/s  (whole bags)")
    print(
        f"embedding alone {embed_rate:7.1f} bags/s (floor): inference at "
        f"{infer_rate / embed_rate:.2f} of it"
    )
    print(f"peak resident memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
