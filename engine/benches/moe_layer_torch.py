"""The same MoE layer as examples/moe_layer_bench.rs in PyTorch (CPU), for a side-by-side ratio.

d=256, 16 routed + 1 shared SwiGLU experts (width 256), sigmoid router, top-4 with a selection
bias, weights from the unbiased scores normalised, loss = mean(out^2), forward + backward, f32,
median of 20 after 3 warm-up runs. Usage: python3 engine/benches/moe_layer_torch.py [TOKENS...]
"""
import sys
import time

import torch

D, E, K, INNER = 256, 16, 4, 256


class Expert(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.gate = torch.nn.Linear(D, width, bias=False)
        self.up = torch.nn.Linear(D, width, bias=False)
        self.down = torch.nn.Linear(width, D, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class Moe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(D, E, bias=False)
        self.register_buffer("bias", torch.randn(E) * 0.01)
        self.experts = torch.nn.ModuleList(Expert(INNER) for _ in range(E))
        self.shared = Expert(INNER)

    def forward(self, x):
        scores = torch.sigmoid(self.router(x))
        idx = torch.topk(scores.detach() + self.bias, K, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        flat_idx = idx.flatten()
        order = torch.argsort(flat_idx, stable=True)
        rows = order // K
        counts = torch.bincount(flat_idx, minlength=E).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            r = rows[start:start + n]
            slots = order[start:start + n]
            y = self.experts[e](x[r]) * w.flatten()[slots].unsqueeze(1)
            out = out.index_add(0, r, y)
            start += n
        return out + self.shared(x)


def main():
    torch.manual_seed(0)
    sizes = [int(a) for a in sys.argv[1:]] or [512, 2048]
    layer = Moe()
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}")
    for tokens in sizes:
        x = torch.randn(tokens, D, requires_grad=True)
        times = []
        for i in range(23):
            t0 = time.perf_counter()
            out = layer(x)
            loss = (out * out).mean()
            loss.backward()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        times.sort()
        med = times[len(times) // 2]
        print(f"pytorch MoE layer fwd+bwd: T={tokens:5}  median {med * 1e3:.2f} ms  {tokens / med:.0f} tokens/s")


if __name__ == "__main__":
    main()
