"""Tiny models built from configs (random weights, no download) for the test suite."""

from __future__ import annotations

import functools

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
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
)

CORPUS = [
    "USER: what is shown in the picture? ASSISTANT: a red square on a blue background.",
    "USER: describe the image in detail. ASSISTANT: there is a cat sitting next to a dog.",
    "the quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
] * 10
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


@functools.lru_cache(maxsize=1)
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
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
