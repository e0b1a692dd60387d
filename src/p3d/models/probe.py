"""What a model's attention needs under context parallelism, found by running its tiny version once.

Context parallelism (and packed documents) split the sequence: each rank runs everything but attention
on its own tokens, in the order it holds them, with their global positions; attention sees the whole
sequence by global token index. That is exact only if
1. p3d can reach the model's attention: through transformers' attention interface, the model's own
   SDPA call or `_attn` method (p3d's attention replaces it), or, for attention written by hand, the
   model's own code given the gathered keys and values or the gathered whole sequence (the routes of
   parallel/context.py, tried in that order),
2. what it asks of p3d's attention (causal, sliding window, softcap, sinks, no dropout) is what p3d's does, and
3. nothing outside attention depends on where a token sits in the local sequence (positions must
   come from `position_ids`, not from counting tokens; no convolutions or recurrences over tokens).

Rather than list architectures, p3d checks this on the model itself: a shrunk copy of the config
(same architecture and features, tiny sizes), fp32 on the CPU, is run
- with its own eager attention on a 24-token sequence, and
- with p3d's route on the same tokens reordered as cp=2 holds them (chunks 0, 3, 1, 2) and their
  global positions (for the routes that keep the model's code, also each cp=2 rank alone, the other
  rank's share of every all-gather replayed); with packed documents, also two documents packed into
  one row with positions restarting, against each document run alone.
The logits must agree (1e-4); a route is used only where they do. A second, training-mode pass records
the dropout the attention asks for. Results are cached per config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from p3d.config.schema import CPLayout
from p3d.models import tiny
from p3d.parallel.context import (
    OWN_ATTENTION_ROUTES,
    attending_in_one_process,
    context_parallel_attention,
    attend_over_whole_sequence,
    gather_keys_and_values,
    register_attention,
    replace_attn_methods,
    use_global_positions,
    with_p3d_sdpa,
)
from p3d.parallel.cp_attention import CPComm, TilePlan
from p3d.parallel.sharding import ChunkRange, SequenceSharding

PROBE_ATTENTION = "p3d_cp_probe"
SEQ, BATCH, TOLERANCE = 24, 2, 1e-4
CP2_ORDER = (0, 3, 1, 2)  # the chunks cp=2 (balanced) holds, rank 0's then rank 1's
DOCUMENT_LENGTHS = (10, 14)
OTHER_ROUTES = ("sdpa", "attn_method", "gathered_keys", "whole_sequence")  # tried in this order where the interface does not serve


@dataclass
class Findings:
    """What the probe saw."""

    attention_calls: int = 0
    dropout: float = 0.0
    bidirectional: bool = False
    windows: set = field(default_factory=set)
    softcap: bool = False
    sinks: bool = False
    reordered_error: float | None = None  # max |logit difference| with the tokens in cp=2's order
    documents_error: float | None = None  # ... with two packed documents
    failure: str | None = None  # the probe itself could not run
    route: str = "interface"  # how p3d's attention replaces the model's (see parallel/context.py)
    token_arguments: dict = field(default_factory=dict)  # whole_sequence: the attention's per-token arguments {name: dim}

    @property
    def route_name(self) -> str:
        """The attention implementation the model runs under the probe's p3d attention."""
        return {"sdpa": "sdpa", "attn_method": "eager", "gathered_keys": "eager", "whole_sequence": "eager"}.get(self.route, PROBE_ATTENTION)

    @property
    def causal_by_mask(self) -> bool:
        """Attention modules that say is_causal=False, in a model whose results are those of causal attention."""
        return self.bidirectional and _exact(self)

    @property
    def plain_causal(self) -> bool:
        return not (self.windows or self.softcap or self.sinks)


class _Recorder:
    """The probe's attention function: records each call, then runs p3d's."""

    def __init__(self):
        self.findings: Findings | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        found = self.findings
        found.attention_calls += 1
        if module.training:
            found.dropout = max(found.dropout, float(dropout or 0.0))
            return _eager_stand_in(query, value)
        if kwargs.get("is_causal") is False:
            found.bidirectional = True
            return _eager_stand_in(query, value)
        if getattr(module, "is_causal", True) is False:
            # Only a hint (transformers' eager attention follows the mask the model builds: BigBirdPegasus's
            # decoder says False and masks causally): marked causal, which the comparison with the model's
            # own attention then confirms, or not (a bidirectional model).
            found.bidirectional = True
            module.is_causal = True
        if kwargs.get("sliding_window"):
            found.windows.add(int(kwargs["sliding_window"]))
        found.softcap |= bool(kwargs.get("softcap"))
        found.sinks |= kwargs.get("s_aux") is not None
        return context_parallel_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs)


def _eager_stand_in(query, value):
    """Shape-correct output when only recording (training-mode pass, or a layer p3d refuses anyway)."""
    groups = query.shape[1] // value.shape[1]
    return value.repeat_interleave(groups, dim=1).transpose(1, 2).contiguous(), None


_recorder = _Recorder()


class _Runs:
    """A one-process stand-in for SequenceSharding: the tokens in the given runs of global indices."""

    def __init__(self, runs: list[ChunkRange]):
        self.runs = runs

    def chunk_ranges(self, rank: int, seq_len: int) -> list[ChunkRange]:
        return self.runs

    def token_indices(self, rank: int, seq_len: int) -> torch.Tensor:
        return torch.cat([torch.arange(run.global_start, run.global_start + run.length) for run in self.runs])

    def gathered_token_indices(self, seq_len: int) -> torch.Tensor:
        return self.token_indices(0, seq_len)  # one process holds them all


def _cp2_runs() -> tuple[list[ChunkRange], torch.Tensor]:
    size = SEQ // len(CP2_ORDER)
    runs = [ChunkRange(chunk * size, slot * size, size) for slot, chunk in enumerate(CP2_ORDER)]
    order = torch.cat([torch.arange(run.global_start, run.global_start + run.length) for run in runs])
    return runs, order


def probe_config(config: PretrainedConfig) -> PretrainedConfig:
    """The same architecture and features, tiny sizes (dropout kept: the probe reports it)."""
    shrunk = tiny.shrink(config, keep_features=True)
    values = {**config.to_dict(), **shrunk}
    values.pop("model_type", None)
    try:
        return AutoConfig.for_model(config.model_type, **values)
    except Exception:  # some configs refuse their own to_dict() values (tuples come back as lists): set them instead
        small = copy.deepcopy(config)
        for name, value in shrunk.items():
            if not isinstance(value, dict):
                setattr(small, name, value)
        return small


_cache: dict[tuple[str, bool], Findings] = {}


def probe(config: PretrainedConfig, with_documents: bool) -> Findings:
    """What the probe finds for this config (computed once per process)."""
    key = (config.to_json_string(use_diff=False), with_documents)
    if key not in _cache:
        _cache[key] = _probe(config, with_documents)
    return copy.deepcopy(_cache[key])


def _probe(config: PretrainedConfig, with_documents: bool) -> Findings:
    findings = Findings()
    try:
        model = _build(probe_config(config))
    except Exception as error:  # noqa: BLE001 - whatever stops the probe is reported as one line
        findings.failure = f"its tiny copy cannot be built ({_first_line(error)})"
        return findings
    _recorder.findings = findings
    try:
        _record_training_dropout(model)
        findings.attention_calls = 0
        findings.reordered_error = _reordered_error(model)
    except Exception as error:  # noqa: BLE001
        findings.failure = f"its forward with p3d's attention fails ({_first_line(error)})"
    for route in OTHER_ROUTES:  # not through the interface: torch's SDPA called itself, an _attn method, or by hand?
        if findings.attention_calls == 0 or not _exact(findings):
            attempt, routed = _probe_route(config, route)
            if routed is not None and _exact(attempt):
                findings.__dict__.update(attempt.__dict__)
                model = routed
    try:
        if with_documents and findings.attention_calls and not findings.failure:
            findings.documents_error = _documents_error(model, attention=findings.route_name)
    except Exception:  # noqa: BLE001 - e.g. a position embedding that takes one row of positions for all rows
        findings.documents_error = None
    finally:
        _recorder.findings = None
    return findings


def _exact(found: Findings) -> bool:
    return not found.failure and found.reordered_error is not None and found.reordered_error <= TOLERANCE


def _probe_route(config: PretrainedConfig, route: str) -> tuple[Findings, object]:
    """The route's findings and model; the model is None where the route does not reach the model's attention."""
    attempt = Findings(route=route)
    previous, _recorder.findings = _recorder.findings, attempt
    try:
        model = _build(probe_config(config), attention=attempt.route_name)
        _route_through_p3d(model, route)
        if route not in OWN_ATTENTION_ROUTES:
            _record_training_dropout(model, attention=attempt.route_name)
        attempt.attention_calls = 0
        reference = _build(probe_config(config), attention="eager")
        attempt.reordered_error = _reordered_error(model, attention=attempt.route_name, reference=reference, per_rank=route in OWN_ATTENTION_ROUTES)
        model.p3d_probe_reference = reference
    except Exception:  # noqa: BLE001 - the route cannot run this model
        return attempt, None
    finally:
        _recorder.findings = previous
    return attempt, (model if attempt.attention_calls else None)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


def _build(config: PretrainedConfig, attention: str = "eager"):
    register_attention(PROBE_ATTENTION, _recorder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    use_global_positions(model)  # as enable_context_parallel does
    return model.float()


def _route_through_p3d(model, route: str) -> None:
    from p3d.models import architecture

    arch = architecture(model.config)
    if route in OWN_ATTENTION_ROUTES:
        attentions = arch.self_attentions(model)
        if route == "gathered_keys":
            attentions = [found for found in attentions if found.key is not None]
            gather_keys_and_values(attentions)
        else:
            attend_over_whole_sequence(attentions, _recorder.findings.token_arguments, discover=True, rebuilt_arguments=arch.whole_sequence_arguments)
        for attention in attentions:
            attention.module.register_forward_pre_hook(_count_attention_call)
        return
    for block in arch.decoder_blocks(model):
        if route == "sdpa":
            block.forward = with_p3d_sdpa(block.forward, block, _recorder)
        else:
            replace_attn_methods(block, _recorder)


def _count_attention_call(module, args):
    _recorder.findings.attention_calls += 1


def _logits(model, input_ids, position_ids) -> torch.Tensor:
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()


def _with_attention(model, name: str):
    model.set_attn_implementation(name)
    return model


def _tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1 << 20, (BATCH, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _record_training_dropout(model, attention: str = PROBE_ATTENTION) -> None:
    _with_attention(model, attention).train()
    input_ids = _tokens(SEQ, 0) % _vocab(model)
    model(input_ids=input_ids, position_ids=torch.arange(SEQ).expand(BATCH, SEQ), use_cache=False)
    model.eval()


def _vocab(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


@torch.no_grad()
def _reordered_error(model, attention: str = PROBE_ATTENTION, reference=None, per_rank: bool = False) -> float:
    """`reference`: the same model (same weights) whose eager attention is the truth; `model` itself by default.
    `per_rank` (the routes that keep the model's attention code): also each cp=2 rank's own tokens alone, what
    the other rank contributes to each all-gather replayed from the run over all tokens, so the model's code
    meets more keys than queries (or more tokens than the rank holds) as it will under cp=2."""
    input_ids = _tokens(SEQ, 1) % _vocab(model)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    reference = _logits(_with_attention(reference or model, "eager"), input_ids, positions)
    runs, order = _cp2_runs()
    plan = TilePlan(_Runs(runs), 0, SEQ, None, torch.device("cpu"))
    recording = _RecordingComm()
    with attending_in_one_process(plan, recording):
        reordered = _logits(_with_attention(model, attention), input_ids[:, order], positions[:, order])
    error = (reordered - reference[:, order]).abs().max().item()
    if per_rank:
        sharding = SequenceSharding(2, CPLayout.balanced)  # holds the chunks of CP2_ORDER: rank 0 the first half
        for rank in range(2):
            tokens = sharding.token_indices(rank, SEQ)
            with attending_in_one_process(TilePlan(sharding, rank, SEQ, None, torch.device("cpu")), _ReplayComm(rank, recording.outputs)):
                own = _logits(model, input_ids[:, tokens], positions[:, tokens])
            error = max(error, (own - reference[:, tokens]).abs().max().item())
    return error


class _RecordingComm(CPComm):
    """A cp group of one that keeps what each all-gather was given."""

    def __init__(self):
        super().__init__(None)
        self.outputs: list[torch.Tensor] = []

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.outputs.append(tensor)
        return super().all_gather(tensor)


class _ReplayComm(CPComm):
    """cp=2 in one process: this rank's tensors are its own, the other rank's half is replayed from a recorded
    run over all tokens (laid out as cp=2 holds them: rank 0's tokens first)."""

    def __init__(self, rank: int, recorded: list[torch.Tensor]):
        super().__init__(None)
        self.size, self.rank = 2, rank
        self.recorded = iter(recorded)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        recorded = next(self.recorded)
        (tokens,) = [dim for dim in range(tensor.dim()) if recorded.shape[dim] != tensor.shape[dim]]  # all tokens there, half here
        halves = recorded.chunk(2, dim=tokens)
        return torch.stack([tensor if source == self.rank else halves[source] for source in range(2)])


@torch.no_grad()
def _documents_error(model, attention: str = PROBE_ATTENTION) -> float:
    """Two rows of two packed documents with their boundaries in different places, against each document alone."""
    truth = _with_attention(getattr(model, "p3d_probe_reference", model), "eager")
    rows = [DOCUMENT_LENGTHS, DOCUMENT_LENGTHS[::-1]]
    total = sum(DOCUMENT_LENGTHS)
    packed_ids, positions, document_ids, alone = [], [], [], []
    for row, lengths in enumerate(rows):
        documents = [_tokens(length, 2 + 2 * row + index)[:1] % _vocab(model) for index, length in enumerate(lengths)]
        alone.append(torch.cat([_logits(truth, ids, torch.arange(ids.shape[1])[None]) for ids in documents], dim=1))
        packed_ids.append(torch.cat(documents, dim=1))
        positions.append(torch.cat([torch.arange(length) for length in lengths])[None])
        document_ids.append(torch.cat([torch.full((length,), index) for index, length in enumerate(lengths)])[None])
    document_ids = torch.cat(document_ids)
    plan = TilePlan(_Runs([ChunkRange(0, 0, total)]), 0, total, document_ids, torch.device("cpu"))
    with attending_in_one_process(plan):
        packed = _logits(_with_attention(model, attention), torch.cat(packed_ids), torch.cat(positions))
    return (packed - torch.cat(alone)).abs().max().item()


def context_parallel_problems(config: PretrainedConfig, why: str, fix: str, with_documents: bool) -> list[str]:
    """One line for each reason p3d's attention under `why` would not give the model's results."""
    found = probe(config, with_documents)
    name = f"model.arch={config.model_type}"
    if found.failure:
        return [f"{name}: p3d cannot check that {why} is exact for it: {found.failure}; {fix}"]
    if found.dropout > 0:
        keys = _dropout_keys(config, found.dropout)
        return [f"{keys}: p3d's attention ({why}) has no attention dropout; set it to 0"]
    if found.attention_calls == 0:
        return [
            f"{name}: its attention does not go through transformers' attention interface, and p3d's other ways in (its SDPA "
            f"call, an _attn method, its own code with the keys or the whole sequence gathered) do not give its results, so p3d "
            f"cannot run it under {why}; {fix}"
        ]
    if found.bidirectional and not found.causal_by_mask:
        return [f"{name}: {type(config).__name__} attends bidirectionally (is_causal=false or is_decoder=false), which p3d's attention under {why} does not support (causal only); {fix}"]
    if found.reordered_error is None or found.reordered_error > TOLERANCE:
        return [
            f"{name}: outside attention its forward depends on where tokens sit in the sequence (positions not taken from "
            f"position_ids, or convolutions/recurrences over tokens), so splitting the sequence ({why}) would change its results; {fix}"
        ]
    if with_documents and (found.documents_error is None or found.documents_error > TOLERANCE):
        return [f"{name}: packed documents do not give each document's own results (its positions do not restart per row with position_ids); use data.packing=stream"]
    return []


def _dropout_keys(config: PretrainedConfig, value: float) -> str:
    text = tiny.text_config(config)
    keys = [name for name, field_value in vars(text).items() if "drop" in name and field_value == value]
    return ", ".join(f"model.config.{key}={value}" for key in keys) or f"the attention dropout ({value})"
