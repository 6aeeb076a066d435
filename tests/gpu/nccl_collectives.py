"""One rank per GPU: NCCL all-reduce / all-gather / reduce-scatter against the arithmetic."""
import os

import torch
import torch.distributed as dist

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
x = torch.full((1 << 20,), float(rank + 1), device="cuda", dtype=torch.bfloat16)
dist.all_reduce(x)
assert torch.all(x == world * (world + 1) / 2)
out = torch.empty(world * 4, device="cuda")
dist.all_gather_into_tensor(out, torch.full((4,), float(rank), device="cuda"))
assert torch.equal(out, torch.arange(world, device="cuda").float().repeat_interleave(4))
part = torch.empty(4, device="cuda")
dist.reduce_scatter_tensor(part, torch.ones(world * 4, device="cuda"))
assert torch.all(part == world)
dist.barrier()
print(f"nccl ok rank {rank}", flush=True)
dist.destroy_process_group()
