"""One training step of the conditional DDPM: the diffusion loss and TrainStep (loss, backward,
clip, AdamW), eager through Accelerate or captured once and replayed as a CUDA graph."""
import torch
import torch.nn.functional as F

from dataloader import DataError, first_line


def diffusion_loss(model, noise_scheduler, x0, y, layout, noise, t, snr=None, snr_gamma=0.0,
                   weight=None):
    """MSE to the noise (epsilon) or to v, optionally min-SNR-gamma weighted per sample. weight
    (B, 1, H, W) makes each sample's MSE a weighted mean over its pixels (--fg-weight); layout
    (B, K, 5) is what a grounded model reads (K = 0 for the others)."""
    x_t = noise_scheduler.add_noise(x0, noise, t)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(x0, noise, t)
    pred = model(x_t, t, y, layout).float()
    err = F.mse_loss(pred, target, reduction="none")
    if weight is None:
        loss = err.mean(dim=(1, 2, 3))
    else:
        loss = (err * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3))
    if snr_gamma > 0:  # Hang et al. 2023: weight min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v)
        s = snr[t]
        w = s.clamp(max=snr_gamma)
        eps = noise_scheduler.config.prediction_type == "epsilon"
        loss = loss * (w / s if eps else w / (s + 1))
    return loss.mean()


class TrainStep:
    """One optimizer step on a batch: diffusion loss, backward, gradient clip, AdamW.

    Eager: through Accelerate (autocast, DDP). With cuda_graph=True (one CUDA process): a few
    eager warm-up steps on a side stream, then the whole step is captured once into a CUDA graph
    and every later call copies its batch into the graph's static inputs and replays it. Why:
    small models at GPU batch sizes are bound by Python and kernel launches, which a replay
    skips (measured: results/train-variants-*-graph.json). Every call is exactly
    one optimizer step on its own batch, in both modes. The learning rate lives in a device
    tensor (read by the captured AdamW); call sync_lr() after changing param_groups' "lr".
    A capture that fails prints one warning line and the run goes on eagerly.
    """

    WARMUP = 3  # eager steps before capture (cuDNN autotuning, optimizer state, lazy inits)

    def __init__(self, acc, model, optimizer, noise_scheduler, snr, snr_gamma, grad_clip,
                 cuda_graph=False):
        self.acc, self.model, self.optimizer = acc, model, optimizer
        self.noise_scheduler, self.snr, self.snr_gamma = noise_scheduler, snr, snr_gamma
        self.clip = grad_clip or float("inf")
        self.cuda_graph, self.calls, self.graph = cuda_graph, 0, None
        if cuda_graph:
            device = next(model.parameters()).device
            if device.type != "cuda" or acc.num_processes != 1:
                raise DataError(f"--cuda-graph: needs one CUDA process (got {device.type} x "
                                f"{acc.num_processes})")
            for g in optimizer.param_groups:
                if not (g.get("capturable") and g.get("fused")):
                    raise DataError("--cuda-graph: the optimizer must be AdamW(fused=True, "
                                    "capturable=True)")
            self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
            self.sync_lr()

    def sync_lr(self):
        """Point every param group at the one lr tensor, set to the group's current value (a
        scheduler may have stored a float). No host sync: fill_ is an asynchronous kernel."""
        if not self.cuda_graph:
            return
        for g in self.optimizer.param_groups:
            if g["lr"] is not self.lr:
                self.lr.fill_(float(g["lr"]))
                g["lr"] = self.lr

    def _step(self, x0, y, layout, noise, t, weight=None):
        args = (self.model, self.noise_scheduler, x0, y, layout, noise, t, self.snr,
                self.snr_gamma, weight)
        if self.cuda_graph:  # no Accelerate wrappers: autocast (as --mixed-precision says)
            # without its weight cache, which must not outlive a capture
            bf16 = self.acc.mixed_precision == "bf16"
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                loss = diffusion_loss(*args)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        else:
            loss = diffusion_loss(*args)
            self.acc.backward(loss)
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return loss.detach(), grad_norm

    def __call__(self, *batch):
        """batch = (x0, y, layout, noise, t[, weight]), the same fields at every call -> (loss, grad
        norm) as device tensors (no host sync)."""
        self.calls += 1
        if self.cuda_graph and self.graph is None and self.calls > self.WARMUP:
            self._capture(*batch)
        if self.replaying:
            for dst, src in zip(self.static, batch, strict=True):
                dst.copy_(src)
            self.graph.replay()
            return self.static_out
        # Eager: every step without graphs; with them, the warm-up steps (on a side stream, as
        # capture wants) and every step after a failed capture.
        side = torch.cuda.Stream() if self.cuda_graph and self.graph is None else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # (a no-op for None)
            out = self._step(*batch)
            self.optimizer.zero_grad(set_to_none=True)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, *batch):
        """Record one step into self.graph (nothing runs: the caller's replay is the step); on
        failure, one warning line and self.graph = False (eager from now on)."""
        self.static = [v.clone() for v in batch]
        self.optimizer.zero_grad(set_to_none=True)  # grads are (re)written by the graph
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.static_out = self._step(*self.static)
        except RuntimeError as e:
            print(f"warning: CUDA graph capture failed ({first_line(e)[:200]}); continuing "
                  "without it",
                  flush=True)
            self.graph = False
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def replaying(self):
        """True once the step runs as a CUDA graph replay."""
        return self.graph is not None and self.graph is not False

    def optimizer_state(self):
        """optimizer.state_dict() with float learning rates, loadable with or without graphs."""
        state = self.optimizer.state_dict()
        for g in state["param_groups"]:  # (initial_lr stays a float: the scheduler saw floats)
            g["lr"] = float(g["lr"])
        return state
