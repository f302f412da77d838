"""Vision-site merging (Reduction + proportional attention) and encoder scores read before the LLM."""

from dataclasses import dataclass

import tiny
import torch

import tokenprune
from tokenprune.core.stage import Reduction, Stage


@dataclass
class PairMerge(tokenprune.Method):
    """Test method: average each even patch with the next one (size 2), at one encoder layer."""

    name = "pairmerge"
    summary = "test only"
    layer: int = 2

    def stages(self, anatomy, budget):
        def select(ctx):
            x, orig = ctx.features, ctx.orig
            size = ctx.size if ctx.size is not None else torch.ones(orig.shape, dtype=x.dtype)
            wx = x * size[..., None]
            tokens = (wx[:, 0::2] + wx[:, 1::2]) / (size[:, 0::2] + size[:, 1::2])[..., None]
            return Reduction(tokens, orig[:, 1::2], size[:, 0::2] + size[:, 1::2])

        return [Stage(self.name, "vision", self.layer, select)]


def _reference_vit(model, px, layer):
    """Naive reference: run ViT layers by hand, merging pairs before `layer`, with log-size bias."""
    vit = model.vit
    h = vit.embeddings(px)
    bias = None
    for i, block in enumerate(vit.layers):
        if i == layer:
            cls, p = h[:, :1], h[:, 1:]
            h = torch.cat([cls, (p[:, 0::2] + p[:, 1::2]) / 2], 1)
            sizes = torch.cat([torch.ones(h.shape[0], 1), torch.full((h.shape[0], h.shape[1] - 1), 2.0)], 1)
            bias = sizes.log()[:, None, None, :]
        h = block(h, bias)
    return model.classifier(vit.layernorm(h)[:, 0])


def test_merge_with_proportional_attention_matches_naive_reference():
    model = tiny.vit()
    model.set_attn_implementation("eager")
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = _reference_vit(model, px, 2)
    with tokenprune.patch(model, PairMerge(layer=2)) as handle, torch.no_grad():
        out = model(pixel_values=px).logits
    assert torch.allclose(out, ref, atol=1e-5)
    kept = handle.trace.stages[0].kept
    assert kept.shape == (2, 32) and kept[0].tolist() == list(range(1, 64, 2))
    assert handle.trace.visual_tokens_per_layer == [64.0, 64.0] + [32.0] * 4


def test_merge_inside_llava_tower_reaches_the_llm():
    model, proc = tiny.llava()  # 3 tower layers, features from layer -2 (output of layer 1)
    inputs = tiny.batch(proc)
    with tokenprune.patch(model, PairMerge(layer=1)) as handle:
        out = tiny.greedy(model, inputs, 3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    (stage,) = handle.trace.stages
    assert stage.site == "vision" and stage.kept[0].tolist() == list(range(1, 16, 2))
    assert handle.trace.realized_budget == 0.5


@dataclass
class Probe(tokenprune.Method):
    """Test method: records the pre-LLM encoder scores it is given and keeps everything."""

    name = "probe"
    summary = "test only"
    seen: dict = None

    def stages(self, anatomy, budget):
        def select(ctx):
            self.seen.update(cls=ctx.score("cls_attention", layer=1), keys=ctx.get("keys", layer=-2), ctx=ctx)
            return torch.where(ctx.valid, torch.arange(ctx.orig.shape[1]).expand_as(ctx.orig), -1)

        return [Stage(self.name, "pre_llm", -1, select, capture=(1,))]


def test_pre_llm_cls_attention_maps_tiles_to_tokens():
    model, proc = tiny.llava_next()
    model.set_attn_implementation("eager")
    inputs = tiny.batch(proc, sizes=((40, 70), (64, 32)))
    seen = {}
    with tokenprune.patch(model, Probe(seen=seen)), torch.no_grad():
        model(**inputs)
        tiles = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], [5, 3])])
        att = model.model.vision_tower(tiles, output_attentions=True).attentions[1][:, :, 0].mean(1)
    ctx = seen["ctx"]
    tile_offset = [0, 5]
    n_checked = 0
    for b in range(2):
        for j in range(int(ctx.n[b])):
            tile = int(ctx.meta["tile"][b, j])
            if tile < 0:
                assert seen["cls"][b, j] == float("-inf")  # newline tokens have no CLS attention
                continue
            token = 1 + int(ctx.meta["row"][b, j]) * 4 + int(ctx.meta["col"][b, j])
            assert torch.allclose(seen["cls"][b, j], att[tile_offset[b] + tile, token], atol=1e-6)
            n_checked += 1
    assert n_checked > 40 and seen["keys"].shape[:2] == ctx.orig.shape
