"""Train a small classifier with fused_flat on several processes: DDP or FSDP2.

    torchrun --nproc-per-node 2 -m fused_flat.examples.train_distributed \\
        --strategy ddp --optimizer fsgld --steps 50

CPU processes talk over gloo; with GPUs (one per process) it uses NCCL and the device
cuda:LOCAL_RANK. Multi-node: the usual torchrun flags (--nnodes, --node-rank,
--rdzv-endpoint). Every rank draws the same global batch from a synthetic data set and
trains on its slice, so the run is the same as one process on the whole batch: the
noise is a pure function of (seed, bucket, step, tag, element index), the seed is rank
0's, and FSDP2 shards keep their elements' unsharded indices. At the end the script checks
that the replicas hold identical parameters and prints a checksum that does not depend
on the strategy (up to floating-point reduction order).
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import fused_flat
from fused_flat.distributed import load_checkpoint, save_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    p.add_argument("--optimizer", choices=("fsgld", "sgld", "rwp", "sam", "msam-local"), default="fsgld",
                   help="msam-local: SAM whose ascent step uses each rank's own gradient "
                        "(first backward under no_sync, DDP only) = m-SAM with m = per-rank batch")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over ranks)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--beta", type=float, default=1e6, help="inverse temperature (FSGLD/SGLD)")
    p.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    p.add_argument("--seed", type=int, default=0, help="model, data and noise seed")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint", default=None, help="save model + optimizer here at the end "
                   "(torch.distributed.checkpoint)")
    p.add_argument("--resume", default=None, help="load a checkpoint written by --checkpoint")
    p.add_argument("--cpu", action="store_true", help="use CPU/gloo even when GPUs are present")
    return p.parse_args(argv)


def setup(args):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and not args.cpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120),
                                **({"device_id": device} if backend == "nccl" else {}))
    return rank, world, device, backend


def make_data(seed: int, n: int = 4096, d: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, classes, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return x, y


def make_model(seed: int, device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 63), nn.Tanh(),
                         nn.Linear(63, 4)).to(device)   # 63 rows: an uneven FSDP2 shard


def wrap(model, args, world, device):
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if world == 1:
            return model, model
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None), model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model


def make_optimizer(args, params):
    if args.optimizer == "fsgld":
        return fused_flat.FSGLD(params, lr=args.lr, beta=args.beta, momentum=args.momentum, seed=args.seed)
    if args.optimizer == "sgld":
        return fused_flat.SGLD(params, lr=args.lr, beta=args.beta, momentum=args.momentum, seed=args.seed)
    if args.optimizer == "rwp":
        return fused_flat.RWP(params, lr=args.lr, sigma=0.01, momentum=args.momentum, seed=args.seed)
    return fused_flat.SAM(params, lr=args.lr, momentum=args.momentum, rho=args.rho)


def full_params(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in model.parameters()]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.optimizer == "msam-local" and args.strategy != "ddp":
        raise SystemExit("--optimizer msam-local needs --strategy ddp (the first backward runs "
                         "under DDP's no_sync)")
    rank, world, device, backend = setup(args)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    local = args.batch_size // world
    x_all, y_all = make_data(args.seed)
    model = make_model(args.seed, device)
    fwd, inner = wrap(model, args, world, device)
    opt = make_optimizer(args, inner.parameters())
    start = 0
    if args.resume:
        start = load_checkpoint(args.resume, inner, opt, extra={"step": 0})["step"]
    loss_fn = nn.CrossEntropyLoss()
    if rank == 0:
        print(f"fused_flat {fused_flat.__version__}: {args.strategy} on {world} process(es), "
              f"{backend}, device {device.type}; {type(opt).__name__}"
              f"{'' if getattr(opt, 'seed', None) is None else f' seed {opt.seed}'}; "
              f"global batch {args.batch_size} ({local} per rank)", flush=True)
    t0 = time.perf_counter()
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(args.seed * 100003 + step)
        idx = torch.randint(0, x_all.shape[0], (args.batch_size,), generator=g)[rank * local:(rank + 1) * local]
        x, y = x_all[idx].to(device), y_all[idx].to(device)

        def closure():
            opt.zero_grad()
            loss = loss_fn(fwd(x), y)
            loss.backward()
            return loss

        if args.optimizer in ("sam", "msam-local"):
            opt.zero_grad()
            if args.optimizer == "msam-local" and world > 1:
                with fwd.no_sync():          # g1 from this rank's batch only: no all-reduce
                    loss = loss_fn(fwd(x), y)
                    loss.backward()
            else:
                loss = loss_fn(fwd(x), y)
                loss.backward()
            opt.step(closure)
        else:
            loss = opt.step(closure)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            loss = loss.detach().clone()
            if world > 1:
                dist.all_reduce(loss)
            if rank == 0:
                print(f"step {step + 1:4d}  loss {loss.item() / world:.4f}", flush=True)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(x_all.to(device)).argmax(1) == y_all.to(device)).float().mean()
    params = full_params(inner)
    checksum = sum(float(p.double().abs().sum()) for p in params)
    identical = True
    if world > 1:
        flat = torch.cat([p.reshape(-1) for p in params]).float()
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        identical = all(torch.equal(gathered[0], t) for t in gathered)
    if args.checkpoint:
        save_checkpoint(args.checkpoint, inner, opt, extra={"step": args.steps})
    if rank == 0:
        print(f"done: {args.steps - start} steps in {elapsed:.2f} s; train accuracy {acc.item():.4f}; "
              f"parameter checksum {checksum:.6f}; replicas identical: {identical}", flush=True)
        if args.checkpoint:
            print(f"checkpoint: {args.checkpoint}", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
