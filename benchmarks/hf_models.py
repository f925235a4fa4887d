"""Small random-weight Hugging Face models built from configs (no hub download), with example inputs.

Each entry: name -> (build() -> model, inputs(model) -> dict of example inputs, head(model) -> the
module whose output width must be kept (classifier / LM head)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Spec = tuple[Callable[[], nn.Module], Callable[[nn.Module], dict[str, Any]], Callable[[nn.Module], nn.Module]]


def _text(vocab: int = 128, length: int = 16) -> Callable[[nn.Module], dict[str, Any]]:
    def inputs(model: nn.Module) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return inputs


def _image(size: int = 32, channels: int = 3) -> Callable[[nn.Module], dict[str, Any]]:
    def inputs(model: nn.Module) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(1, channels, size, size, generator=g)}

    return inputs


def _seq2seq(vocab: int = 128) -> Callable[[nn.Module], dict[str, Any]]:
    def inputs(model: nn.Module) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :6]}

    return inputs


def specs() -> dict[str, Spec]:
    import transformers as T

    dec: dict[str, Any] = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "max_position_embeddings": 64}
    enc: dict[str, Any] = {**dec, "num_labels": 3}
    vit: dict[str, Any] = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_labels": 5}
    lm_head: Callable[[nn.Module], nn.Module] = lambda m: m.lm_head
    cls: Callable[[nn.Module], nn.Module] = lambda m: m.classifier
    return {
        "hf-bert": (lambda: T.BertForSequenceClassification(T.BertConfig(**enc)), _text(), cls),
        "hf-roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**enc, pad_token_id=1)), _text(),
                       lambda m: m.classifier.out_proj),
        "hf-distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=128, dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=3)),
            _text(), cls),
        "hf-gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                            n_positions=64)), _text(), lm_head),
        "hf-llama-gqa": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**dec, num_key_value_heads=2)), _text(), lm_head),
        "hf-mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**dec, num_key_value_heads=2)), _text(), lm_head),
        "hf-qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**dec, num_key_value_heads=2)), _text(), lm_head),
        "hf-phi": (lambda: T.PhiForCausalLM(T.PhiConfig(**dec)), _text(), lm_head),
        "hf-vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**vit)), _image(), cls),
        "hf-deit": (lambda: T.DeiTForImageClassification(T.DeiTConfig(**vit)), _image(), cls),
        "hf-swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5)),
            _image(), cls),
        "hf-convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)), _image(), cls),
        "hf-resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)), _image(), lambda m: m.classifier[-1]),
        "hf-mobilenetv2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            image_size=32, depth_multiplier=0.35, num_labels=5)), _image(), cls),
        "hf-efficientnet": (lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=5)),
            _image(), cls),
        "hf-regnet": (lambda: T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=5)),
            _image(), lambda m: m.classifier[-1]),
        "hf-t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)), _seq2seq(), lm_head),
    }
