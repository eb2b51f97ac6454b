"""Throwaway: how fast does a 2-layer d_model=128 GDN learn each task's defaults on CPU."""
import math, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, ".")
import tasks
from gdn_exp.ops import gated_delta_rule

torch.set_num_threads(2)

class GDN(nn.Module):
    def __init__(self, d, H=2, Dk=64, expand_v=1):
        super().__init__()
        self.H, self.Dk, self.Dv = H, Dk, Dk * expand_v
        self.q = nn.Linear(d, H * Dk, bias=False); self.k = nn.Linear(d, H * Dk, bias=False)
        self.v = nn.Linear(d, H * self.Dv, bias=False)
        self.convs = nn.ModuleList([nn.Conv1d(n, n, 4, groups=n, padding=3) for n in (H*Dk, H*Dk, H*self.Dv)])
        self.a = nn.Linear(d, H); self.b = nn.Linear(d, H); self.gp = nn.Linear(d, H * self.Dv, bias=False)
        A = torch.empty(H).uniform_(1, 16); self.A_log = nn.Parameter(A.log())
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.norm = nn.RMSNorm(self.Dv); self.o = nn.Linear(H * self.Dv, d, bias=False)
    def forward(self, x):
        B, T, _ = x.shape
        def conv(lin, c):
            y = c(lin(x).transpose(1, 2))[..., :T].transpose(1, 2)
            return F.silu(y)
        q = F.normalize(conv(self.q, self.convs[0]).view(B, T, self.H, self.Dk), dim=-1)
        k = F.normalize(conv(self.k, self.convs[1]).view(B, T, self.H, self.Dk), dim=-1)
        v = conv(self.v, self.convs[2]).view(B, T, self.H, self.Dv)
        g = -self.A_log.exp() * F.softplus(self.a(x) + self.dt_bias)
        beta = torch.sigmoid(self.b(x))
        o, _ = gated_delta_rule(q, k, v, g, beta, backend="torch")
        o = self.norm(o) * F.silu(self.gp(x).view(B, T, self.H, self.Dv))
        return self.o(o.reshape(B, T, -1))

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d); self.mix = GDN(d)
        self.w1 = nn.Linear(d, 4 * d, bias=False); self.w3 = nn.Linear(d, 4 * d, bias=False); self.w2 = nn.Linear(4 * d, d, bias=False)
    def forward(self, x):
        x = x + self.mix(self.n1(x)); h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))

class LM(nn.Module):
    def __init__(self, V, d=128, L=2):
        super().__init__()
        self.emb = nn.Embedding(V, d); self.blocks = nn.ModuleList([Block(d) for _ in range(L)])
        self.norm = nn.RMSNorm(d); self.head = nn.Linear(d, V, bias=False)
    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks: h = b(h)
        return self.head(self.norm(h))

def run(name, budget=90, lr=3e-3, bs=64, steps=2000, **params):
    torch.manual_seed(0)
    train = tasks.make_task(name, seed=tasks.task_seed(0, "train"), num_examples=bs * steps, **params)
    test = tasks.make_task(name, seed=tasks.task_seed(0, "test"), num_examples=512, **params)
    V = tasks.make_config(name, **params).vocab_size
    model = LM(V)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    sched = lambda s: min(1, (s + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * min(s / steps, 1)))
    t0 = time.time(); acc = 0
    for step in range(steps):
        for gr in opt.param_groups: gr["lr"] = lr * sched(step)
        x = train["input_ids"][step*bs:(step+1)*bs]; y = train["labels"][step*bs:(step+1)*bs]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        if step % 25 == 0:
            with torch.no_grad():
                pred = model(test["input_ids"]).argmax(-1); m = test["labels"] != -100
                acc = (pred[m] == test["labels"][m]).float().mean().item()
            print(f"{name} step {step} loss {loss.item():.3f} acc {acc:.3f} t {time.time()-t0:.1f}s", flush=True)
            if acc >= 0.99 or time.time() - t0 > budget: break
    print(f"RESULT {name} {params} acc {acc:.3f} steps {step} time {time.time()-t0:.1f}s", flush=True)

if __name__ == "__main__":
    import json
    name = sys.argv[1]; params = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    budget = float(sys.argv[3]) if len(sys.argv) > 3 else 90
    run(name, budget=budget, **params)
