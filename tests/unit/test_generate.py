"""`p3d generate`: its options, prompts (plain and chat) and one-line errors, in one process."""

from __future__ import annotations

import pytest

from p3d import cli
from p3d.errors import ConfigError
from p3d.export import byte_tokenizer
from p3d.generate import GenerateOptions, option_problems, parse_args, prompt_ids

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def test_options_default_to_greedy_and_sampling_options_are_checked():
    source, options = parse_args(["runs/x", "--prompt", "Hello"])
    assert str(source) == "runs/x" and options == GenerateOptions("Hello", max_new_tokens=64, temperature=0.0, top_p=1.0, chat=False, seed=0)
    assert option_problems(GenerateOptions("a", temperature=0.7, top_p=0.9)) == []
    assert option_problems(GenerateOptions("a", max_new_tokens=0)) == ["--max-new-tokens=0: must be >= 1"]
    assert option_problems(GenerateOptions("a", temperature=-1)) == ["--temperature=-1: must be a finite number >= 0 (0: greedy)"]
    assert option_problems(GenerateOptions("a", top_p=0.5)) == ["--top-p=0.5 samples, and greedy decoding does not: add --temperature (e.g. 0.8)"]
    assert option_problems(GenerateOptions("a", temperature=1, top_p=0.0)) == ["--top-p=0.0: must be in (0, 1]"]


def test_the_prompt_is_tokenized_as_training_data_and_chat_uses_the_template():
    tokenizer = byte_tokenizer()
    assert prompt_ids(tokenizer, GenerateOptions("héllo")) == list("héllo".encode())  # no special tokens added
    with pytest.raises(ConfigError, match="--chat: the run's tokenizer has no chat template"):
        prompt_ids(tokenizer, GenerateOptions("hi", chat=True))
    tokenizer.chat_template = CHAT_TEMPLATE
    assert prompt_ids(tokenizer, GenerateOptions("hi", chat=True)) == list(b"<user>hi<assistant>")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["runs/x"], "p3d generate: the following arguments are required: --prompt"),
        (["runs/x", "--prompt", "a", "--max-new-tokens", "many"], "p3d generate: argument --max-new-tokens: invalid int value: 'many'"),
        (["runs/x", "--prompt", "a", "--top-k", "5"], "p3d generate: unrecognized arguments: --top-k 5"),
        (["{tmp}/nowhere", "--prompt", "a"], "{tmp}/nowhere: no such checkpoint directory"),
    ],
)
def test_bad_generate_arguments_are_one_line_and_exit_2(args, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", *(arg.replace("{tmp}", str(tmp_path)) for arg in args)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("p3d: error: " + expected.replace("{tmp}", str(tmp_path))), lines[0]
