"""Tiny models built from configs (random weights, no download) for the test suite."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
)

import tokenprune
from tokenprune.core.select import pad_rows
from tokenprune.core.stage import Stage

CORPUS = [
    "USER: what is shown in the picture? ASSISTANT: a red square on a blue background.",
    "USER: describe the image in detail. ASSISTANT: there is a cat sitting next to a dog.",
    "the quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
] * 10
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


@functools.lru_cache(maxsize=1)
def tokenizer() -> PreTrainedTokenizerFast:
    return _bpe_tokenizer(("<image>",))


def _bpe_tokenizer(image_tokens: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """A byte-level BPE over CORPUS with the shared specials and a model family's image tokens, left padding."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", *image_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    hf.padding_side = "left"
    return hf


def text_config(layers: int = 8, hidden: int = 64) -> LlamaConfig:
    tok = tokenizer()
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )


def clip_config(image: int = 32, patch: int = 8, layers: int = 3) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image,
        patch_size=patch,
        projection_dim=32,
    )


def llava(layers: int = 8, seed: int = 0, image: int = 32, patch: int = 8):
    """Tiny LLaVA-1.5: CLIP tower 32x32 / patch 8 (16 visual tokens), 8-layer Llama with GQA."""
    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = LlavaConfig(
        vision_config=clip_config(image, patch),
        text_config=text_config(layers),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image}, crop_size={"height": image, "width": image}
        ),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, proc


def llava_siglip(strategy: str = "full", seed: int = 0):
    """Tiny LLaVA on a SigLIP tower (no CLS token; 16 visual tokens, 15 with strategy "default")."""
    torch.manual_seed(seed)
    tok = tokenizer()
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text_config(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    proc = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=0,
    )
    return LlavaForConditionalGeneration(cfg).eval(), proc


def unsupported_vlm(kind: str, seed: int = 0):
    """Tiny PaliGemma or Gemma 3 on a SigLIP tower: VLMs tokenprune has no adapter for."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 300}  # fmt: skip
    if kind == "paligemma":
        cfg = PaliGemmaConfig(vision_config=vision, text_config={"model_type": "gemma", **text},
                              image_token_index=299, projection_dim=32)  # fmt: skip
        return PaliGemmaForConditionalGeneration(cfg).eval()
    cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4, image_token_index=299)
    return Gemma3ForConditionalGeneration(cfg).eval()


def llava_next(layers: int = 8, seed: int = 0):
    """Tiny LLaVA-NeXT with anyres pinpoints up to 64x64 on a 32x32 tower."""
    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = LlavaNextConfig(
        vision_config=clip_config(),
        text_config=text_config(layers),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(cfg).eval()
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, proc


def vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        num_labels=5,
    )
    return ViTForImageClassification(cfg).eval()


def clip_vision(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(clip_config(32, 4, layers=6)).eval()


def siglip_vision(seed: int = 0) -> SiglipVisionModel:
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=32, patch_size=4
    )
    return SiglipVisionModel(cfg).eval()


def image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


PROMPTS = ["USER: <image>\nwhat is shown in the picture? ASSISTANT:", "USER: <image>\ndescribe it. ASSISTANT:"]


def batch(proc, sizes=((40, 48), (32, 32)), prompts=PROMPTS):
    imgs = [image(h, w, i + 1) for i, (h, w) in enumerate(sizes)]
    return proc(images=imgs, text=list(prompts[: len(imgs)]), return_tensors="pt", padding=True)


def single(proc, i: int, sizes=((40, 48), (32, 32)), prompts=PROMPTS):
    h, w = sizes[i]
    return proc(images=[image(h, w, i + 1)], text=[prompts[i]], return_tensors="pt")


def greedy(model, inputs, n: int = 5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def generate_logits(model, inputs, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate`` of exactly ``n`` tokens: (new tokens (B, n), logits of each step (B, n, V))."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def greedy_alone(model, proc, img, prompt: str, method: str | None, budget: float | None, max_tokens: int):
    """One request run alone through ``tokenprune.patch`` (None: unpatched) + greedy ``generate``: its text (cut at
    EOS), kept set (None unpatched) and realised budget -- what a server's batched answer must equal."""
    inputs = proc(images=[img], text=[prompt], return_tensors="pt")
    handle = tokenprune.patch(model, method, budget=budget) if method else None
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        text = proc.tokenizer.decode(ids, skip_special_tokens=True)
        if handle is None:
            return text, None, 1.0
        return text, handle.trace.stages[-1].kept[0].tolist(), handle.trace.realized_budget
    finally:
        tokenprune.unpatch(model)


def cache_free_logits(model, inputs, tokens: torch.Tensor, t: int) -> torch.Tensor:
    """Last-position logits of the prompt + the first ``t`` generated ``tokens``, recomputed in one forward
    without a cache (1-D positions from the mask; images from ``inputs``): the reference for decode step t."""
    seq = torch.cat([inputs["input_ids"], tokens[:, :t]], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :t])], 1)
    extra = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    with torch.no_grad():
        return model(input_ids=seq, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1),
                     use_cache=False, **extra).logits[:, -1]


@dataclass
class Fixed(tokenprune.Method):
    """Test method: keep exactly the given original visual indices per sample -- ``kept`` at one ``layer``,
    or at each ``(layer, kept)`` of ``plan`` (stages named fixed, or fixed0, fixed1, ...)."""

    name = "fixed"
    summary = "test only"
    kept: tuple = ()
    site: str = "llm"
    layer: int = 3
    positions: str = "keep"
    plan: tuple = ()

    def stages(self, anatomy, budget):
        def make(kept):
            def select(ctx):
                return pad_rows([(torch.isin(ctx.orig[b], torch.tensor(want)) & ctx.valid[b]).nonzero().flatten()
                                 for b, want in enumerate(kept)])

            return select

        if not self.plan:
            return [Stage("fixed", self.site, self.layer, make(self.kept), self.positions)]
        return [Stage(f"fixed{i}", self.site, layer, make(kept), self.positions)
                for i, (layer, kept) in enumerate(self.plan)]


# --- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: packed tower, 2x2 merged units, M-RoPE -------------------------
QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PATCH = 8


@functools.lru_cache(maxsize=1)
def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return _bpe_tokenizer(tuple(QWEN_SPECIAL))


def _qwen_ids() -> dict:
    tok = qwen_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in zip(("start", "end", "image", "video"), QWEN_SPECIAL)}
    return {
        "image_token_id": ids["image"],
        "video_token_id": ids["video"],
        "vision_start_token_id": ids["start"],
        "vision_end_token_id": ids["end"],
    }


def _qwen_text(layers: int, mrope: list[int], **extra) -> dict:
    tok = qwen_tokenizer()
    return dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=1,
        eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        **extra,
    )


def qwen2_vl(layers: int = 8, seed: int = 0):
    """Tiny Qwen2-VL: 4-block packed tower (patch 8, 2x2 merge), 8-layer Qwen2 LM with M-RoPE."""
    torch.manual_seed(seed)
    vision = dict(depth=4, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=QWEN_PATCH,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(layers, [2, 3, 3]), **_qwen_ids())
    return Qwen2VLForConditionalGeneration(cfg).eval()


def qwen2_5_vl(layers: int = 8, seed: int = 0):
    """Tiny Qwen2.5-VL: 4-block windowed tower (windows of 2x2 merged units, full attention in blocks
    1 and 3), 8-layer LM with M-RoPE."""
    torch.manual_seed(seed)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                  fullatt_block_indexes=[1, 3], in_channels=3)
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(layers, [2, 3, 3]), **_qwen_ids())
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def qwen3_vl(layers: int = 8, seed: int = 0):
    """Tiny Qwen3-VL: 4-block tower with deepstack features from blocks 1 and 2 (added after LM
    layers 0 and 1), 8-layer Qwen3 LM (q/k norms) with interleaved M-RoPE."""
    torch.manual_seed(seed)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  num_position_embeddings=64, deepstack_visual_indexes=[1, 2])
    text = _qwen_text(layers, [2, 3, 3], head_dim=16)
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text, **_qwen_ids())
    return Qwen3VLForConditionalGeneration(cfg).eval()


QWEN_PROMPTS = ["USER: {} what is shown in the picture? ASSISTANT:", "USER: {} describe it. ASSISTANT:"]


def qwen_inputs(samples: list[list], video_seed: int = 0, timestamps: bool = False) -> dict:
    """Model inputs for Qwen-style VLMs, built as the processor does: ``samples`` are lists of text
    pieces and visual items, ``("image", (h, w))`` (a random image of that size, seeded by its
    order; or ``("image", a PIL image)``) or ``("video", (frames, h, w))`` (random patches); each
    item becomes vision_start, one placeholder per merged unit, vision_end. With ``timestamps``
    (Qwen3-VL) every temporal patch of a video is its own such run, after a ``<t seconds>`` text.
    Left padded; ``mm_token_type_ids`` 1 image, 2 video."""
    tok = qwen_tokenizer()
    ids = _qwen_ids()
    proc = Qwen2VLImageProcessorPil(min_pixels=4 * QWEN_PATCH**2, max_pixels=256 * QWEN_PATCH**2,
                                    patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2)
    gen = torch.Generator().manual_seed(video_seed)
    rows, types, pixels, grids, vpixels, vgrids = [], [], [], [], [], []
    n_img = 0
    for sample in samples:
        row, typ = [], []
        for piece in sample:
            if isinstance(piece, str):
                t = tok(piece, add_special_tokens=False)["input_ids"]
                row += t
                typ += [0] * len(t)
                continue
            kind, size = piece
            if kind == "image":
                n_img += 1
                img = size if isinstance(size, Image.Image) else image(*size, n_img)
                out = proc(images=[img], return_tensors="pt")
                pixels.append(out["pixel_values"])
                grids.append(out["image_grid_thw"])
                thw, token, code = out["image_grid_thw"][0], ids["image_token_id"], 1
            else:
                frames, h, w = size
                thw = torch.tensor([frames // 2, h // QWEN_PATCH, w // QWEN_PATCH])
                vpixels.append(torch.randn(int(thw.prod()), 3 * 2 * QWEN_PATCH**2, generator=gen))
                vgrids.append(thw[None])
                token, code = ids["video_token_id"], 2
            runs = int(thw[0]) if timestamps and kind == "video" else 1
            n = int(thw.prod()) // 4 // runs
            for t in range(runs):
                stamp = tok(f"<{t}.0 seconds>", add_special_tokens=False)["input_ids"] if runs > 1 else []
                row += stamp + [ids["vision_start_token_id"]] + [token] * n + [ids["vision_end_token_id"]]
                typ += [0] * len(stamp) + [0] + [code] * n + [0]
        rows.append(row)
        types.append(typ)
    width = max(len(r) for r in rows)
    out = {
        "input_ids": torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        "mm_token_type_ids": torch.tensor([[0] * (width - len(t)) + t for t in types]),
    }
    if pixels:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(pixels), torch.cat(grids)
    if vpixels:
        out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(vpixels), torch.cat(vgrids)
    return out


def qwen_batch(sizes=((40, 72), (32, 32))) -> dict:
    """Two samples, one image each, of different sizes (so different token counts)."""
    return qwen_inputs([[p.split("{}")[0], ("image", s), p.split("{}")[1]] for p, s in zip(QWEN_PROMPTS, sizes)])


# --- LLaVA-OneVision: SigLIP tower (no CLS), anyres-max tiles, pooled video frames -------------------


def llava_onevision(layers: int = 8, seed: int = 0):
    """Tiny LLaVA-OneVision: SigLIP 32x32 / patch 8 (16 tokens per crop, no CLS), anyres pinpoints up to
    64x64, 8-layer Qwen2 LM; image / video placeholders are the Qwen tokenizer's pads."""
    torch.manual_seed(seed)
    ids = _qwen_ids()
    text = {k: v for k, v in _qwen_text(layers, [2, 3, 3]).items() if k != "rope_parameters"}
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=32, patch_size=8).to_dict(),
        text_config={"model_type": "qwen2", **text},
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def onevision_inputs(model, samples: list[list], video_seed: int = 0) -> dict:
    """Model inputs for LLaVA-OneVision, as its processor builds them: ``samples`` as for
    :func:`qwen_inputs` (``("video", (frames, h, w))`` gives random 32x32 frames, seeded by order;
    images are seeded by their size, so a sample built alone matches its row of a batch); each image
    gets as many placeholders as the model's own packing produces (tiles only for single-image
    samples)."""
    tok = qwen_tokenizer()
    ids = _qwen_ids()
    proc = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    gen = torch.Generator().manual_seed(video_seed)
    images = [piece[1] for sample in samples for piece in sample if not isinstance(piece, str) and piece[0] == "image"]
    per_sample = [sum(1 for p in s if not isinstance(p, str) and p[0] == "image") for s in samples]
    out: dict = {}
    lengths: list[int] = []
    if images:
        px = proc(images=[image(h, w, 1000 * h + w) for h, w in images], return_tensors="pt")  # seeded by size
        out["pixel_values"], out["image_sizes"] = px["pixel_values"], px["image_sizes"]
        out["batch_num_images"] = torch.tensor([n for n in per_sample if n > 0])
        with torch.no_grad():
            feats = model.model.get_image_features(px["pixel_values"], px["image_sizes"],
                                                   batch_num_images=out["batch_num_images"]).pooler_output
        lengths = [f.shape[0] for f in feats]
    videos = []
    rows, i = [], 0
    for sample in samples:
        row = []
        for piece in sample:
            if isinstance(piece, str):
                row += tok(piece, add_special_tokens=False)["input_ids"]
            elif piece[0] == "image":
                row += [ids["image_token_id"]] * lengths[i]
                i += 1
            else:
                frames = piece[1][0]
                videos.append(torch.randn(frames, 3, 32, 32, generator=gen))
                row += [ids["video_token_id"]] * (frames * 4 + 1)
        rows.append(row)
    width = max(len(r) for r in rows)
    out["input_ids"] = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    out["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    return out
