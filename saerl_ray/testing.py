"""Tiny random models and tokenizers built from a config: what tests and CI smoke runs use
instead of hub downloads. Lives in the package so Ray workers can import it.

    python -c "from saerl_ray.testing import save_tiny_model; print(save_tiny_model('/tmp/tiny'))"
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """Byte-level WordLevel tokenizer (vocab 259), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {(chr(i) if 32 <= i < 127 else f"<0x{i:02X}>"): i for i in range(256)}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0x00>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<0x00>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(num_layers: int = 4, hidden: int = 64, seed: int = 0):
    """A random Llama-architecture causal LM (SmolLM2's family) small enough for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=259, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny_model(path: str | Path, num_layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        tiny_model(num_layers, hidden, seed).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path
