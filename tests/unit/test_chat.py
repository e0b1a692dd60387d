"""Chat data: conversations rendered with the tokenizer's template or p3d's, and only the
assistant's tokens as targets (the label mask itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from p3d.config.compose import compose, to_object
from p3d.data import IGNORE_INDEX, ByteTokenizer, build_sampler, build_tokenizer, builtin_conversations, open_cache, render_builtin, training_sources
from p3d.errors import ConfigError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "12, naïvely."},
]


def chat_config(tmp_path, *overrides):
    return to_object(compose(["data=chat", f"data.cache_dir={tmp_path / 'cache'}", *overrides]))


def test_the_builtin_template_marks_the_assistant_turns_and_their_end():
    text, spans = render_builtin(CONVERSATION)
    assert text.startswith("<|system|>\nBe brief.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n4.<|end|>\n")
    assert [text[low:high] for low, high in spans] == ["4.<|end|>", "12, naïvely.<|end|>"]


def test_byte_tokens_are_targets_exactly_where_the_assistant_speaks():
    text, spans = render_builtin(CONVERSATION)
    ((ids, targets),) = ByteTokenizer().encode_marked([text], [spans])
    assert bytes(ids.tolist()).decode() == text
    marked = bytes(ids[targets].tolist()).decode()
    assert marked == "4.<|end|>12, naïvely.<|end|>"  # multi-byte characters included whole


def test_labels_of_the_builtin_chat_set_are_only_assistant_tokens(tmp_path):
    c = chat_config(tmp_path, "data.seq_len=256")
    sampler = build_sampler(c.data, c.model, 0, 8, 8, 1, 0)
    (batch,) = sampler.micro_batches(0)
    assert batch.document_ids is not None  # conversations are packed apart
    for labels in batch.labels:
        targets = labels != IGNORE_INDEX
        assert 0 < targets.sum() < len(labels) // 2
        said = bytes(labels[targets].tolist()).decode(errors="replace")
        assert "<|user|>" not in said and "<|system|>" not in said and "<|assistant|>" not in said
        assert "<|end|>" in said
    # label tokens of the whole source: the cache counted them while building
    manifest = open_cache(training_sources(c.data)[0], ByteTokenizer(), tmp_path / "cache").manifest
    assert 0 < manifest["parts"]["train"]["target_tokens"] < manifest["parts"]["train"]["tokens"] // 2


def test_a_conversation_read_through_the_cache_has_exactly_its_assistant_tokens_as_labels(tmp_path):
    """The label mask itself, end to end (file -> cache -> window -> batch), against the text's own spans."""
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    text, _ = render_builtin(CONVERSATION)
    data = text.encode()
    c = chat_config(tmp_path, f"data.path={tmp_path / 'chat.jsonl'}", f"data.seq_len={len(data)}")
    (batch,) = build_sampler(c.data, c.model, 0, 1, 1, 1, 0).micro_batches(0)  # the one window: the conversation and its end
    spans = [(data.index(part), data.index(part) + len(part)) for part in ("4.<|end|>".encode(), "12, naïvely.<|end|>".encode())]
    expected = [data[i + 1] if any(low <= i + 1 < high for low, high in spans) else IGNORE_INDEX for i in range(len(data))]
    assert batch.labels[0].tolist() == expected
    assert batch.input_ids[0].tolist() == list(data)
    assert batch.valid_label_count() == sum(high - low for low, high in spans)


def test_the_builtin_chat_set_is_fixed_and_varied():
    conversations = builtin_conversations()
    assert conversations == builtin_conversations() and len(conversations) == 2000
    roles = {message["role"] for conversation in conversations for message in conversation}
    assert roles == {"system", "user", "assistant"}
    assert sum(len(conversation) == 4 for conversation in conversations) > 200  # multi-turn ones too
    assert len({json.dumps(conversation) for conversation in conversations}) > 1000


# --- a tokenizer with its own chat template ---------------------------------------------------------

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tokenizer(directory, template: str | None) -> None:
    """A small byte-level BPE tokenizer with ChatML special tokens (trained here, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([m["content"] for c in builtin_conversations(200) for m in c], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    if template:
        wrapped.chat_template = template
    wrapped.save_pretrained(directory)


def test_the_tokenizers_own_template_marks_the_assistant_turns(tmp_path):
    save_tokenizer(tmp_path / "tok", CHATML)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    c = chat_config(tmp_path, f"data.tokenizer={tmp_path / 'tok'}", f"data.path={tmp_path / 'chat.jsonl'}")
    tokenizer = build_tokenizer(c.data, c.model)
    cached = open_cache(training_sources(c.data)[0], tokenizer, tmp_path / "cache")
    stream = cached.stream("train")
    ids, targets = np.asarray(stream.tokens, dtype=np.int64), np.asarray(stream.targets, dtype=bool)
    decode = tokenizer.tokenizer.decode
    assert decode(ids[:-1].tolist()) == tokenizer.tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert decode(ids[targets].tolist()) == "4.<|im_end|>\n12, naïvely.<|im_end|>\n"
    assert ids[-1] == tokenizer.eos_token_id and not targets[-1]
    # the end-of-turn id inside the conversation does not split it: one document
    assert list(stream.starts) == [0] and (ids[:-1] == tokenizer.eos_token_id).sum() == 5


def test_a_template_that_does_not_render_turn_by_turn_is_refused(tmp_path):
    save_tokenizer(tmp_path / "tok", "{{ messages | length }} turns: " + CHATML)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    c = chat_config(tmp_path, f"data.tokenizer={tmp_path / 'tok'}", f"data.path={tmp_path / 'chat.jsonl'}")
    with pytest.raises(ConfigError, match=r"^data.tokenizer: its chat template does not render chat.jsonl line 1 turn by turn"):
        open_cache(training_sources(c.data)[0], build_tokenizer(c.data, c.model), tmp_path / "cache")


def test_a_tokenizer_without_a_template_uses_the_builtin_one(tmp_path):
    save_tokenizer(tmp_path / "tok", None)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    c = chat_config(tmp_path, f"data.tokenizer={tmp_path / 'tok'}", f"data.path={tmp_path / 'chat.jsonl'}")
    tokenizer = build_tokenizer(c.data, c.model)
    stream = open_cache(training_sources(c.data)[0], tokenizer, tmp_path / "cache").stream("train")
    ids, targets = np.asarray(stream.tokens, dtype=np.int64), np.asarray(stream.targets, dtype=bool)
    assert tokenizer.tokenizer.decode(ids[targets].tolist()) == "4.<|end|>12, naïvely.<|end|>"


def test_label_tokens_count_targets_only():
    from p3d.data import Rows, make_batch
    from p3d.config.schema import Packing

    rows = Rows(np.arange(12).reshape(2, 6), np.zeros((2, 6), dtype=bool), np.asarray([[0, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=bool))
    batch = make_batch(rows, Packing.documents)
    assert batch.valid_label_count() == 3 + 5
    assert torch.equal(batch.labels[0], torch.tensor([1, 2, IGNORE_INDEX, IGNORE_INDEX, 5]))
