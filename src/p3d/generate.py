"""`p3d generate RUN_DIR_OR_CHECKPOINT --prompt TEXT`: what a checkpoint writes, in one process.

The checkpoint (a run directory's newest complete one, verified like `p3d export` does) is loaded
whole into the Hugging Face model it was trained as, with the run's tokenizer, and transformers'
`generate` continues the prompt: greedy by default, sampled with --temperature > 0 (and --top-p).
The generation config is the one `p3d export` writes (it stops at the tokenizer's end-of-text id),
so the exported model gives the same tokens. No process group and no export step are needed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from p3d.errors import ConfigError

USAGE = """usage: p3d generate RUN_DIR_OR_CHECKPOINT --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--chat] [--seed S]

Continue TEXT with the newest complete checkpoint of a run directory (or the checkpoint named) and
print the generated text (the prompt is not repeated). Greedy unless --temperature > 0.
  --max-new-tokens N   tokens to generate at most (default 64; fewer if the end-of-text token comes)
  --temperature T      0 (default): greedy; > 0: sample with this temperature
  --top-p P            with --temperature > 0: sample from the smallest set of tokens whose probability reaches P (default 1)
  --chat               wrap the prompt as a user message in the tokenizer's chat template
  --seed S             the sampling seed (default 0): the same command prints the same text"""


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    chat: bool = False
    seed: int = 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"p3d generate: {message} (see p3d generate --help)")


def parse_args(args: Sequence[str]) -> tuple[Path, GenerateOptions]:
    parser = _Parser(prog="p3d generate", add_help=False)
    parser.add_argument("source")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parsed = parser.parse_args(list(args))
    options = GenerateOptions(parsed.prompt, parsed.max_new_tokens, parsed.temperature, parsed.top_p, parsed.chat, parsed.seed)
    problems = option_problems(options)
    if problems:
        raise ConfigError(problems)
    return Path(parsed.source), options


def option_problems(options: GenerateOptions) -> list[str]:
    problems = []
    if options.max_new_tokens < 1:
        problems.append(f"--max-new-tokens={options.max_new_tokens}: must be >= 1")
    if not options.temperature >= 0 or options.temperature == float("inf"):
        problems.append(f"--temperature={options.temperature}: must be a finite number >= 0 (0: greedy)")
    if not 0 < options.top_p <= 1:
        problems.append(f"--top-p={options.top_p}: must be in (0, 1]")
    elif options.top_p < 1 and options.temperature == 0:
        problems.append(f"--top-p={options.top_p} samples, and greedy decoding does not: add --temperature (e.g. 0.8)")
    if not options.prompt and not options.chat:
        problems.append("--prompt: give some text to continue")
    return problems


def prompt_ids(tokenizer, options: GenerateOptions) -> list[int]:
    """The prompt's tokens as the run tokenized its data (no special tokens added), or with --chat the
    tokenizer's chat template around one user message, ready for the assistant's reply."""
    if not options.chat:
        return tokenizer(options.prompt, add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat: the run's tokenizer has no chat template (p3d's byte tokenizer has none); drop --chat, or train with a data.tokenizer that has one")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": options.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False))


def generate_ids(model, prompt: list[int], options: GenerateOptions) -> list[int]:
    """The tokens transformers' generate appends to the prompt's."""
    inputs = torch.tensor([prompt], device=model.device)
    sampling = options.temperature > 0
    settings = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p, "top_k": None} if sampling else {"do_sample": False}
    torch.manual_seed(options.seed)
    with torch.no_grad():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=options.max_new_tokens, **settings)
    return output[0, inputs.shape[1] :].tolist()


def load_for_generation(source: Path):
    """(checkpoint, model, tokenizer): the verified checkpoint, its whole model (fp32, on the GPU if there is
    one) and the run's tokenizer, with the generation config `p3d export` writes."""
    from p3d.export import align_special_tokens, checkpoint_tokenizer, load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint(source, verb="generate from")
    model = load_model(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint)
    align_special_tokens(model, tokenizer)
    if torch.cuda.is_available():
        model.to("cuda")
    return checkpoint, model, tokenizer


def main(args: Sequence[str]) -> None:
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return
    source, options = parse_args(args)
    from p3d.checkpoint import read_marker

    checkpoint, model, tokenizer = load_for_generation(source)
    prompt = prompt_ids(tokenizer, options)
    print(f"p3d: generating from {checkpoint} (step {read_marker(checkpoint)['step']})", file=sys.stderr, flush=True)
    print(tokenizer.decode(generate_ids(model, prompt, options), skip_special_tokens=True), flush=True)
