"""LGViT exit heads for ``ViTForImageClassification`` and their training (backbone frozen).

Xu et al., "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer", ACM MM 2023
(falcon-xu/LGViT, ``models/deit_highway/highway.py``; reimplemented, not copied):

* **Heterogeneous heads** on intermediate layers: *local perception* heads on the shallower exits
  (1x1 conv -> GELU -> BN, depthwise 3x3 conv -> GELU -> BN, 1x1 conv -> BN, residual, on the patch
  grid) and *global aggregation* heads on the deeper ones (multi-head self-attention over patch
  tokens average-pooled with stride ``sr``; ``sr`` = 2, then 3 for the deepest exits). Each head's
  logits are ``classifier(mean over tokens of the head output + CLS embedding)``.
* **Exit points**: LGViT puts ViT-B's exits after layers 4..11 of 12 (from a third of the depth to
  the second-to-last layer); :func:`default_positions` scales that rule to any depth. The first half
  of the exits get local heads, the rest global heads.
* **Training** (LGViT's second stage, :func:`train_heads`): the backbone and its final head are
  frozen; each exit head learns by self-distillation from the final head -- soft KL at temperature
  2 (weight ``alpha`` = 0.3, the paper's ``loss_coefficient``), plus cross-entropy on labels where
  given (weight 1 - alpha), plus LGViT's feature losses with weight 0.01 each: *heterogeneous*
  (KL between the channel softmax of each head's features and of the final layer's patch states,
  pooled to the head's resolution) and *homogeneous* (MSE of each head's features to the deepest
  head of its kind; Gram matrices for global heads). The teacher is the model's real output (final
  layernorm + classifier); LGViT's code reads the last layer without the final layernorm. Without
  labels the loss is pure self-distillation.

Heads are saved next to a checkpoint as one safetensors file (config in its metadata)::

    python -m tokenprune.early_exit_heads --model tokenprune/demo/checkpoints/vit \
        --out tokenprune/demo/checkpoints/vit/exit_heads.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HEADS_FILE = "exit_heads.safetensors"


def default_positions(num_layers: int) -> list[int]:
    """0-based layers after which LGViT-style exits sit: from a third of the depth to the
    second-to-last layer (ViT-B, 12 layers: ``[3, ..., 10]`` = LGViT's 1-based ``[4, ..., 11]``)."""
    return list(range(max(1, num_layers // 3) - 1, num_layers - 1))


def default_kinds(n: int) -> list[str]:
    """LGViT's split: the shallower half of the exits local, the rest global (sr 2, then 3)."""
    n_local = n // 2
    n_global = n - n_local
    return ["local"] * n_local + [f"global{2 if k < max(1, n_global // 2) else 3}" for k in range(n_global)]


class LocalHead(nn.Module):
    """LGViT local perception head (``highway_conv1_1``): pointwise, depthwise 3x3, pointwise, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))
        self.dw = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.GELU(), nn.BatchNorm2d(dim))
        self.conv2 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        y = x.transpose(1, 2).reshape(b, c, h, w)
        y = self.conv2(self.dw(self.conv1(y)))
        return y.flatten(2).transpose(1, 2) + x


class GlobalHead(nn.Module):
    """LGViT global aggregation head (``GlobalSparseAttn``): self-attention over tokens sampled
    with stride ``sr`` on the patch grid."""

    def __init__(self, dim: int, num_heads: int, sr: int) -> None:
        super().__init__()
        self.num_heads, self.sr = num_heads, sr
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        if self.sr > 1:
            x = x.transpose(1, 2).reshape(b, c, h, w)[:, :, :: self.sr, :: self.sr].flatten(2).transpose(1, 2)
        q, k, v = self.qkv(x).view(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, -1, c))


class ExitHead(nn.Module):
    """One exit: a local or global head on the patch tokens, then ``classifier(pool + CLS)``."""

    def __init__(self, dim: int, num_labels: int, grid: tuple[int, int], kind: str, num_heads: int = 4) -> None:
        super().__init__()
        self.kind, self.grid = kind, tuple(grid)
        if kind == "local":
            self.mixer: nn.Module = LocalHead(dim)
        elif kind.startswith("global"):
            self.mixer = GlobalHead(dim, num_heads, int(kind[len("global"):] or 2))
        else:
            raise ValueError(f"kind: expected 'local' or 'global<sr>', got {kind!r}")
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` (B, 1 + N, D): a layer's raw output (CLS first). Returns logits and the head's
        token features (B, N', D)."""
        cls, patches = hidden[:, 0], hidden[:, 1:]
        feats = self.mixer(patches, *self.grid)
        return self.classifier(feats.mean(1) + cls), feats


class ExitHeads(nn.Module):
    """The exit heads of one ViT classifier, keyed by the 0-based layer they read."""

    def __init__(self, dim: int, num_labels: int, grid: tuple[int, int], num_layers: int,
                 positions: list[int] | None = None, kinds: list[str] | None = None, num_heads: int = 4) -> None:
        super().__init__()
        positions = default_positions(num_layers) if positions is None else [int(p) for p in positions]
        kinds = default_kinds(len(positions)) if kinds is None else list(kinds)
        if len(kinds) != len(positions) or any(not 0 <= p < num_layers - 1 for p in positions):
            raise ValueError(f"positions: expected layers in [0, {num_layers - 2}] with one kind each; "
                             f"got {positions} / {kinds}")
        self.config = {"dim": dim, "num_labels": num_labels, "grid": list(grid), "num_layers": num_layers,
                       "positions": positions, "kinds": kinds, "num_heads": num_heads}
        self.positions = positions
        self.heads = nn.ModuleList([ExitHead(dim, num_labels, grid, k, num_heads) for k in kinds])

    @classmethod
    def for_model(cls, model: nn.Module, positions: list[int] | None = None, kinds: list[str] | None = None
                  ) -> ExitHeads:
        """Heads sized for a ``ViTForImageClassification``."""
        cfg = model.config
        side = cfg.image_size // cfg.patch_size
        return cls(cfg.hidden_size, cfg.num_labels, (side, side), cfg.num_hidden_layers, positions, kinds,
                   cfg.num_attention_heads)

    def by_layer(self, num_layers: int) -> dict[int, ExitHead]:
        """``{layer: head}``; checks the heads were made for a model of this depth."""
        if num_layers != self.config["num_layers"]:
            raise ValueError(f"heads: made for {self.config['num_layers']} layers, the model has {num_layers}")
        self.eval()
        return dict(zip(self.positions, self.heads))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"tokenprune_exit_heads": json.dumps(self.config)})

    @classmethod
    def load(cls, path: str | Path) -> ExitHeads:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            config = json.loads(f.metadata()["tokenprune_exit_heads"])
        heads = cls(config["dim"], config["num_labels"], tuple(config["grid"]), config["num_layers"],
                    config["positions"], config["kinds"], config["num_heads"])
        heads.load_state_dict(load_file(str(path)))
        return heads.eval()


# -- training -----------------------------------------------------------------------------------
def _pool_like(x: torch.Tensor, grid: tuple[int, int], sr: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, *grid)[:, :, ::sr, ::sr].flatten(2).transpose(1, 2)


def _kl_channels(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)


def distillation_loss(heads: ExitHeads, hidden: list[torch.Tensor], teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, alpha: float = 0.3, temperature: float = 2.0,
                      hete: float = 0.01, homo: float = 0.01) -> tuple[torch.Tensor, dict[str, float]]:
    """LGViT stage-2 loss of all exits. ``hidden[i]`` is layer ``i``'s output (B, 1 + N, D)."""
    preds, hetes, feats = [], [], []
    last = hidden[-1][:, 1:]
    t = temperature
    soft = F.log_softmax(teacher_logits / t, -1)
    for pos, head in zip(heads.positions, heads.heads):
        logits, f = head(hidden[pos])
        kd = F.kl_div(F.log_softmax(logits / t, -1), soft, reduction="batchmean", log_target=True) * t * t
        ce = F.cross_entropy(logits, labels) if labels is not None else logits.new_zeros(())
        preds.append((1 - alpha) * ce + alpha * kd if labels is not None else kd)
        sr = 1 if head.kind == "local" else head.mixer.sr
        hetes.append(_kl_channels(f, _pool_like(last, head.grid, sr)))
        feats.append((head.kind == "local", f))
    homos = []
    for local in (True, False):
        group = [f for is_local, f in feats if is_local == local]
        if len(group) > 1:
            ref = group[-1].detach()
            for f in group[:-1]:
                gram = (f, ref) if local else (f.transpose(1, 2) @ f, ref.transpose(1, 2) @ ref)
                homos.append(F.mse_loss(*gram))
    pred = sum(preds)
    het = sum(hetes) if hetes else pred.new_zeros(())
    hom = sum(homos) if homos else pred.new_zeros(())
    loss = pred + hete * het + homo * hom
    return loss, {"pred": float(pred.detach()), "hete": float(het.detach()), "homo": float(hom.detach())}


@torch.no_grad()
def backbone_states(model: nn.Module, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's output and the final logits of a frozen ``ViTForImageClassification``."""
    out = model(pixel_values=pixel_values, output_hidden_states=True)
    return list(out.hidden_states[1:]), out.logits


def train_heads(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                heads: ExitHeads | None = None, steps: int = 1000, lr: float = 1e-3, weight_decay: float = 0.05,
                alpha: float = 0.3, log_every: int = 50, time_budget: float | None = None) -> ExitHeads:
    """Train LGViT exit heads on a frozen ``model`` (LGViT's second stage) and return them.

    ``batches`` yields ``(pixel_values, labels or None)``; training stops after ``steps`` batches or
    ``time_budget`` seconds. AdamW with cosine decay (LGViT fine-tunes with AdamW, lr 5e-5 on
    pre-trained heads; fresh heads on a small backbone want a larger lr).
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    heads = ExitHeads.for_model(model) if heads is None else heads
    heads.train()
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    start = time.time()
    it: Iterator = iter(batches)
    for step in range(steps):
        frac = step / steps if time_budget is None else max(step / steps, (time.time() - start) / time_budget)
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        try:
            pixel_values, labels = next(it)
        except StopIteration:
            break
        hidden, teacher = backbone_states(model, pixel_values)
        with torch.enable_grad():  # callers may be inside no_grad
            loss, parts = distillation_loss(heads, hidden, teacher, labels, alpha=alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            print(json.dumps({"step": step, "t": round(time.time() - start, 1),
                              "loss": round(float(loss.detach()), 4), **{k: round(v, 4) for k, v in parts.items()}}),
                  flush=True)
    return heads.eval()


@torch.no_grad()
def exit_accuracy(model: nn.Module, heads: ExitHeads, pixel_values: torch.Tensor, labels: torch.Tensor
                  ) -> dict[str, float]:
    """Accuracy of every exit head and of the final head on one batch."""
    heads.eval()
    hidden, logits = backbone_states(model, pixel_values)
    acc = {f"exit{p}": float((h(hidden[p])[0].argmax(-1) == labels).float().mean())
           for p, h in zip(heads.positions, heads.heads)}
    acc["final"] = float((logits.argmax(-1) == labels).float().mean())
    return acc


def shapes_batches(processor, batch_size: int = 64, seed: int = 7, split: str = "train"
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of the ViT fixture's task (number of shapes, label = count - 1)."""
    from .demo import generator as S

    i = 0
    while True:
        imgs, ys = [], []
        for _ in range(batch_size):
            img, objs, _ = S.make_scene(split, seed, i)
            imgs.append(img)
            ys.append(len(objs) - 1)
            i += 1
        yield processor(imgs, return_tensors="pt")["pixel_values"], torch.tensor(ys)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train LGViT exit heads for the ViT fixture (backbone frozen).")
    p.add_argument("--model", default=None, help="ViT checkpoint folder (default: the bundled fixture)")
    p.add_argument("--out", default=None, help=f"output file (default: <model>/{HEADS_FILE})")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--time-budget", type=float, default=None, help="seconds")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-labels", action="store_true", help="pure self-distillation (no ground truth)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from .demo import checkpoint_path, load

    path = Path(args.model) if args.model else checkpoint_path("vit")
    model, proc = load("vit", path)
    batches = ((px, None if args.no_labels else y) for px, y in shapes_batches(proc, args.bs))
    heads = train_heads(model, batches, steps=args.steps, lr=args.lr, time_budget=args.time_budget)
    val_px, val_y = next(shapes_batches(proc, 500, seed=1, split="val"))
    print(json.dumps({"val_accuracy": exit_accuracy(model, heads, val_px, val_y)}), flush=True)
    out = Path(args.out) if args.out else path / HEADS_FILE
    heads.save(out)
    print("saved", out, flush=True)


if __name__ == "__main__":
    main()
