"""Tiny in-process models and tokenizer: nothing is downloaded, everything takes milliseconds."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

INIT_RANGE = 0.3

CORPUS = [
    "The Eiffel Tower is located in Paris. The capital of France is Paris.",
    "Danielle Darrieux speaks French. The mother tongue of Danielle Darrieux is French.",
    "Angola is located in Africa. Toyota is owned by a company in Japan.",
    "The following is true. Here is a fact. I read this today. According to the records,",
    "It is well known that Rome is in Italy and Berlin is in Germany. English Antarctica.",
    "Michael Jordan plays basketball. Lionel Messi plays soccer. Tokyo is a city in Asia.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on :data:`CORPUS` in a few milliseconds, with a BOS token."""
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_config(model_type: str, vocab_size: int = 300, layers: int = 2):
    # A large init makes the tiny random model opinionated enough for an edit to move it.
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                  initializer_range=INIT_RANGE)
    if model_type in ("llama", "qwen2", "mistral"):
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[model_type]
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                   **common)
    if model_type == "gpt2":
        return GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, **common)
    if model_type == "gptj":
        return GPTJConfig(n_embd=32, n_layer=layers, n_head=4, n_positions=128, rotary_dim=4, **common)
    if model_type == "gemma3_text":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                max_position_embeddings=128, sliding_window=16, **common)
    raise ValueError(model_type)


def tiny_model(model_type: str = "llama", seed: int = 0, layers: int = 2):
    """A randomly initialised 2-layer model of ``model_type`` (hidden 32), eval mode, frozen."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers=layers))
    model.eval().requires_grad_(False)
    return model


# Facts for the flow tests (refresh, audit): id, prompt, subject, target_new, target_true.
FACTS = [
    ("eiffel", "The {} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    ("jordan", "{} plays the sport of", "Michael Jordan", "soccer", "basketball"),
    ("tokyo", "{} is a city in", "Tokyo", "Africa", "Asia"),
    ("darrieux", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    ("angola", "{} is located in", "Angola", "Antarctica", "Africa"),
    ("messi", "{} plays the sport of", "Lionel Messi", "basketball", "soccer"),
]


def fact(key: str, prompt: str, subject: str, new: str, true: str) -> dict:
    return {"case_id": key, "prompt": prompt, "subject": subject, "target_new": new, "target_true": true,
            "paraphrase_prompts": [f"Here is a fact. {prompt.replace('{}', subject)}"],
            "neighbourhood_prompts": [{"prompt": "The capital of France is", "target": "Paris"}]}
