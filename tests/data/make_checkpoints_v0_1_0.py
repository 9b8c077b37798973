"""Writes tests/data/checkpoints_v0.1.0.pt with fused_flat 0.1.0 (format 2, noise layout 2).

Run from a checkout of the 0.1.0 commit (4c390a0) with PYTHONPATH pointing at it."""
import torch, fused_flat
assert fused_flat.__version__ == "0.1.0"
torch.manual_seed(0)
out = {"version": fused_flat.__version__}
for name, make in [("FSGLD", lambda p: fused_flat.FSGLD(p, lr=0.05, beta=1e6, momentum=0.9, weight_decay=1e-3, seed=123, backend="reference")),
                   ("SAM", lambda p: fused_flat.SAM(p, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, seed=7, backend="reference"))]:
    model = torch.nn.Linear(4, 3)
    opt = make(model.parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    for _ in range(3):
        if name == "SAM":
            closure()
        opt.step(closure)
    out[name] = {"model": model.state_dict(), "optimizer": opt.state_dict(), "x": x, "y": y}
torch.save(out, "/work/main/tests/data/checkpoints_v0.1.0.pt")
print(out["FSGLD"]["optimizer"]["fused_flat"], out["SAM"]["optimizer"]["fused_flat"])
