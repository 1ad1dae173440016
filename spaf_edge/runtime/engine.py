"""The on-device SpAF engine: an export folder run with ONNX Runtime, no torch (DESIGN §6).

Decoding mirrors the PyTorch reference (:mod:`spaf_edge.generation.reference`) phase for
phase — ``prefill``, ``draft``, ``verify``, accept (:func:`spaf_edge.sampling.accept`, the
same code), ``commit`` — so greedy output equals the reference's and the base model's,
and sampling follows the exact speculative rule. State between steps: committed tokens
``x_0 .. x_T``; both KV caches hold positions ``0 .. T-1``; ``x_T`` is pending.

Batch 1 and one generation at a time per engine (the KV caches are the engine's):
starting a generation while a stream of the same engine is unfinished ends that stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from spaf_edge.config import validate_drafting
from spaf_edge.errors import ConfigError, ContextLengthError, ExportFormatError
from spaf_edge.io_names import DRAFT_VOCAB, DRAFTER_GRAPH, LOWER_GRAPH, TOKENIZER, UPPER_GRAPH
from spaf_edge.manifest import Manifest
from spaf_edge.runtime.graphs import DrafterGraph, HostBuffer, LowerGraph, UpperGraph
from spaf_edge.runtime.kv import KVCache
from spaf_edge.runtime.session import Provider, configure_threads, open_session, resolve_provider, session_options
from spaf_edge.runtime.signatures import check_graphs
from spaf_edge.runtime.stream import IncrementalDecoder
from spaf_edge.runtime.tokenizer import TextTokenizer
from spaf_edge.sampling import SamplingParams, accept, choose, logits_to_probs, softmax
from spaf_edge.shared_weights import SharedWeights
from spaf_edge.stats import GenerationStats

log = logging.getLogger(__name__)

MODES = ("spaf", "greedy")  # greedy: plain decoding, one token per full pass (the same-engine baseline)
DECODING_KEYS = (
    "num_draft_tokens", "serial_parallel_transition", "draft_stop_threshold", "temperature", "top_p", "top_k",
)
PREFILL_CHUNK = 64  # prompt positions per prefill call (bounds the logits buffer: rows x V floats)


@dataclass(frozen=True)
class DecodeSettings:
    params: SamplingParams
    num_draft_tokens: int
    serial_parallel_transition: int
    draft_stop_threshold: float | None
    mode: str


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)  # d_1 .. d_D
    probs: list[np.ndarray] = field(default_factory=list)  # q_j over the full vocabulary
    exact: int = 0  # positions T .. T+exact-1 whose cutoff states the lower stack already computed


@dataclass
class EngineResult:
    tokens: list[int]  # new tokens only
    stats: GenerationStats
    text: str | None = None  # None when the export has no tokenizer
    stop_reason: str = ""  # "eos" | "max_new_tokens" | "context"
    prompt_ids: list[int] = field(default_factory=list)


class Engine:
    """Build with :meth:`from_folder`; then :meth:`generate` or :meth:`stream`."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        provider: Provider,
        lower: LowerGraph,
        upper: UpperGraph,
        drafter: DrafterGraph,
        buffers: dict[str, Any],
        tokenizer: TextTokenizer | None,
        draft_vocab: np.ndarray | None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.provider = provider
        self.lower, self.upper, self.drafter = lower, upper, drafter
        self.tokenizer = tokenizer
        self.draft_vocab = draft_vocab  # int64 [V_d] token ids, None = every token
        self.prefill_chunk = prefill_chunk
        self.max_length = manifest.sizes.max_length
        self.vocab_size = manifest.sizes.vocab_size
        self.eos = frozenset(manifest.eos_token_ids)
        self.ids: HostBuffer = buffers["ids"]  # [1, R] int64
        self.hidden: HostBuffer = buffers["hidden"]  # [1, R, H]: exact cutoff states of positions T ..
        self.pseudo: HostBuffer = buffers["pseudo"]  # [1, R, H]: AlignmentHead states
        self.logits: HostBuffer = buffers["logits"]  # [1, R, V] float32
        self.draft_logits: np.ndarray = buffers["draft_logits"]  # [1, 1, V_d] float32
        self.token: np.ndarray = buffers["token"]  # [1, 1] int64: the drafter's input
        self.tokens: list[int] = []  # committed x_0 .. x_T of the current generation
        self._generation = 0  # bumped by every start; an older stream notices and stops

    # ---- construction ---------------------------------------------------
    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        verify: bool = True,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> Engine:
        """Load an export folder: manifest (+ sha256 of every file with ``verify``), graphs, tokenizer."""
        folder = Path(path)
        manifest = Manifest.load(folder, verify_files=verify)
        chosen = resolve_provider(provider)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"Invalid threads={threads!r}: expected an integer >= 1 (or omit it).")
        shared_pool = configure_threads(threads) is not None
        sizes = manifest.sizes
        dtype = np.float16 if manifest.dtype == "float16" else np.float32
        shared = SharedWeights(folder)  # mapped once; every session uses these buffers

        def session(name: str):
            return open_session(folder / name, shared.add_to(session_options(threads, shared_pool), name), chosen)

        sessions = {name: session(name) for name in (LOWER_GRAPH, UPPER_GRAPH, DRAFTER_GRAPH)}
        check_graphs(folder, manifest, dtype, sessions)

        rows = max(prefill_chunk, 8)
        buffers = {
            "ids": HostBuffer((1, rows), np.int64),
            "hidden": HostBuffer((1, rows, sizes.hidden_size), dtype),
            "pseudo": HostBuffer((1, rows, sizes.hidden_size), dtype),
            "logits": HostBuffer((1, rows, sizes.vocab_size), np.float32),
            "draft_logits": np.zeros((1, 1, sizes.draft_vocab_size), dtype=np.float32),
            "token": np.zeros((1, 1), dtype=np.int64),
        }
        draft_logits = ort.OrtValue.ortvalue_from_numpy(buffers["draft_logits"])
        k = manifest.cutoff_layer

        def cache(layers: range) -> KVCache:
            return KVCache(layers, sizes.num_kv_heads, sizes.head_dim, sizes.max_length, dtype, chosen.device)

        lower = LowerGraph(sessions[LOWER_GRAPH], cache(range(0, k)), draft_logits)
        upper = UpperGraph(sessions[UPPER_GRAPH], cache(range(k, sizes.num_layers)))
        drafter = DrafterGraph(sessions[DRAFTER_GRAPH], buffers["token"], draft_logits)
        tokenizer = TextTokenizer.from_folder(folder, manifest.chat_template) if (folder / TOKENIZER).is_file() else None
        engine = cls(
            folder, manifest, chosen, lower, upper, drafter, buffers, tokenizer,
            load_draft_vocab(folder, manifest), prefill_chunk,
        )
        engine.shared_weights = shared  # the sessions' initializers must outlive them
        return engine

    # ---- settings -------------------------------------------------------
    @property
    def defaults(self) -> dict[str, Any]:
        """Decoding defaults: the manifest's ``tuned`` settings over its SpAF config."""
        merged = {**self.manifest.spaf, **(self.manifest.tuned or {})}
        return {key: merged[key] for key in DECODING_KEYS if key in merged}

    def settings(
        self,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        num_draft_tokens: int | None = None,
        serial_parallel_transition: int | None = None,
        draft_stop_threshold: float | None = None,
        mode: str = "spaf",
    ) -> DecodeSettings:
        """Resolve unset options from :attr:`defaults` and validate them (ConfigError)."""
        if mode not in MODES:
            raise ConfigError(f"Invalid mode={mode!r}: expected one of {MODES}.")
        defaults = self.defaults
        params = SamplingParams(
            temperature=defaults.get("temperature", 0.0) if temperature is None else temperature,
            top_k=defaults.get("top_k", 0) if top_k is None else top_k,
            top_p=defaults.get("top_p", 1.0) if top_p is None else top_p,
        )
        n = defaults.get("num_draft_tokens", 5) if num_draft_tokens is None else num_draft_tokens
        s = serial_parallel_transition
        if s is None and isinstance(n, int):
            s = min(defaults.get("serial_parallel_transition", 2), n)
        eta = defaults.get("draft_stop_threshold") if draft_stop_threshold is None else draft_stop_threshold
        validate_drafting(n, s, eta)
        return DecodeSettings(params, n, s, eta, mode)

    # ---- public API -----------------------------------------------------
    def encode(self, prompt: str | Sequence[int], chat: bool = True) -> list[int]:
        """Prompt text (through the chat template when ``chat``) or token ids -> token ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.folder} has no {TOKENIZER}; pass the prompt as token ids.")
            return self.tokenizer.encode_prompt(prompt, chat=chat)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError(f"Token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1}.")
        return ids

    def decode(self, tokens: Sequence[int]) -> str | None:
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else None

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        num_draft_tokens: int | None = None,
        serial_parallel_transition: int | None = None,
        draft_stop_threshold: float | None = None,
        chat: bool = True,
        mode: str = "spaf",
        reuse_cache: bool = False,
    ) -> EngineResult:
        """Generate up to ``max_new_tokens`` tokens; unset options come from :attr:`defaults`.

        ``reuse_cache`` keeps the KV rows of the previous generation's tokens that the new
        prompt starts with (multi-turn chat) instead of recomputing them.
        """
        result, steps = self._start(
            prompt, max_new_tokens, seed, chat, reuse_cache,
            self.settings(temperature, top_p, top_k, num_draft_tokens, serial_parallel_transition,
                          draft_stop_threshold, mode),
        )
        for _ in steps:
            pass
        result.text = self.decode(result.tokens)
        return result

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, **options: Any) -> TextStream:
        """Like :meth:`generate` but iterate text pieces as tokens are committed; ``.result`` at the end."""
        if self.tokenizer is None:
            raise ConfigError(f"{self.folder} has no {TOKENIZER}: streaming text needs one; use generate().")
        seed, chat, reuse = options.pop("seed", None), options.pop("chat", True), options.pop("reuse_cache", False)
        result, steps = self._start(prompt, max_new_tokens, seed, chat, reuse, self.settings(**options))
        return TextStream(steps, IncrementalDecoder(self.tokenizer.decode), result)

    # ---- the decoding loop ----------------------------------------------
    def _start(
        self, prompt, max_new_tokens: int, seed: int | None, chat: bool, reuse_cache: bool, settings: DecodeSettings
    ) -> tuple[EngineResult, Iterator[list[int]]]:
        """Validate eagerly (errors surface at the call, not at the first iteration)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"Invalid max_new_tokens={max_new_tokens!r}: expected an integer >= 1.")
        prompt_ids = self.encode(prompt, chat)
        if not prompt_ids:
            raise ContextLengthError("The prompt is empty; give at least one token.")
        if len(prompt_ids) > self.max_length:
            raise ContextLengthError(
                f"The prompt has {len(prompt_ids)} tokens but the export's context is {self.max_length} "
                "tokens. Shorten the prompt, or re-export with a larger --max-length."
            )
        result = EngineResult(tokens=[], stats=GenerationStats(prompt_tokens=len(prompt_ids)), prompt_ids=prompt_ids)
        self._ensure_rows(settings.num_draft_tokens + 1)
        self._generation += 1
        steps = self._decode(prompt_ids, max_new_tokens, settings, np.random.default_rng(seed), result, reuse_cache)
        return result, steps

    def _decode(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        settings: DecodeSettings,
        rng: np.random.Generator,
        result: EngineResult,
        reuse_cache: bool,
    ) -> Iterator[list[int]]:
        generation = self._generation
        stats, params = result.stats, settings.params
        drafts = settings.num_draft_tokens if settings.mode == "spaf" else 0
        start = time.perf_counter()
        self.prefill(prompt_ids, reuse_cache)
        stats.prefill_seconds = time.perf_counter() - start
        generated = result.tokens
        result.stop_reason = "max_new_tokens"
        while len(generated) < max_new_tokens:
            if self.position >= self.max_length:
                result.stop_reason = "context"
                break
            budget = min(drafts, max_new_tokens - len(generated) - 1, self.max_length - 1 - self.position)
            draft = self.draft(budget, settings.serial_parallel_transition, params, rng, settings.draft_stop_threshold)
            target_probs = logits_to_probs(self.verify(draft), params)  # [D+1, V]
            num_accepted, bonus = accept(draft.tokens, draft.probs, target_probs, params, rng)
            new = self.commit(draft, num_accepted, bonus)
            stats.record(len(draft.tokens), num_accepted)
            new, finished = cut_at_eos(new, self.eos)
            generated.extend(new)
            stats.new_tokens = len(generated)
            if not stats.first_token_seconds:
                stats.first_token_seconds = time.perf_counter() - start
            stats.wall_seconds = time.perf_counter() - start
            yield new
            if generation != self._generation:
                raise RuntimeError("Another generation started on this engine; this stream cannot continue.")
            if finished:
                result.stop_reason = "eos"
                break
        stats.wall_seconds = time.perf_counter() - start

    @property
    def position(self) -> int:
        """T: position of the pending token (= valid length of both caches)."""
        return len(self.tokens) - 1

    def prefill(self, prompt_ids: Sequence[int], reuse_cache: bool = False) -> None:
        """Run both stacks on ``prompt[:-1]`` in chunks; the last prompt token becomes pending.

        With ``reuse_cache``, cached rows of the previous tokens that the prompt starts with are kept.
        """
        keep = common_prefix(self.tokens[: self.position], prompt_ids[:-1]) if reuse_cache else 0
        self.lower.kv.rewind_to(min(keep, self.lower.kv.length))
        self.upper.kv.rewind_to(min(keep, self.upper.kv.length))
        self.tokens = list(prompt_ids)
        body = self.tokens[:-1]
        for begin in range(self.lower.kv.length, len(body), self.prefill_chunk):
            chunk = body[begin:begin + self.prefill_chunk]
            self._run_lower(chunk, row=0)
            self._run_upper(len(chunk))

    def draft(
        self,
        num_drafts: int,
        serial_parallel_transition: int,
        params: SamplingParams,
        rng: np.random.Generator,
        stop_threshold: float | None = None,
    ) -> Draft:
        """Serial drafts through the lower stack, then aligned drafts through the drafter graph."""
        draft = Draft()
        token = self.tokens[-1]
        for j in range(1, num_drafts + 1):
            if j <= serial_parallel_transition:
                self._run_lower([token], row=j - 1)  # exact h(T+j-1) into hidden row j-1
                draft.exact = j
            else:
                self.token[0, 0] = token
                source = self.hidden if j - 1 == serial_parallel_transition else self.pseudo
                self.drafter.run(source.view(j - 2, j - 1), self.pseudo.view(j - 1, j))  # ĥ(T+j-1)
            logits = self.draft_logits[0, 0]  # [V_d]
            q = self.draft_distribution(logits, params)
            if stop_threshold is not None:
                confidence = softmax(logits).max() if params.greedy else q.max()
                if confidence < stop_threshold:
                    break
            token = choose(q, params, rng)
            draft.tokens.append(token)
            draft.probs.append(q)
        return draft

    def verify(self, draft: Draft) -> np.ndarray:
        """One batched target pass over positions ``T .. T+D``. Returns logits [D+1, V] (a view)."""
        sequence = [self.tokens[-1], *draft.tokens]
        if draft.exact < len(sequence):
            self._run_lower(sequence[draft.exact:], row=draft.exact)
        return self._run_upper(len(sequence))

    def commit(self, draft: Draft, num_accepted: int, bonus: int) -> list[int]:
        """Append the accepted drafts and the bonus; cut both caches back to the valid length."""
        new = [*draft.tokens[:num_accepted], bonus]
        valid = self.position + num_accepted + 1  # positions T .. T+n now hold accepted tokens
        self.tokens.extend(new)
        self.lower.kv.rewind_to(valid)
        self.upper.kv.rewind_to(valid)
        return new

    def draft_distribution(self, logits: np.ndarray, params: SamplingParams) -> np.ndarray:
        """Processed draft distribution over the full vocabulary from draft-vocabulary logits [V_d]."""
        probs = logits_to_probs(logits, params)
        if self.draft_vocab is None:
            return probs
        full = np.zeros(self.vocab_size, dtype=np.float64)
        full[self.draft_vocab] = probs
        return full

    # ---- graph calls ----------------------------------------------------
    def _ensure_rows(self, rows: int) -> None:
        """Grow the host buffers (between generations only: their contents are dropped)."""
        if rows > self.hidden.rows:
            for name in ("ids", "hidden", "pseudo", "logits"):
                old: HostBuffer = getattr(self, name)
                setattr(self, name, HostBuffer((1, rows, *old.array.shape[2:]), old.array.dtype))

    def _run_lower(self, tokens: Sequence[int], row: int) -> None:
        """Lower stack on ``tokens`` at the next positions; cutoff states into hidden rows ``row ..``."""
        new = len(tokens)
        self.ids.array[0, :new] = tokens
        self.lower.run(self.ids.view(0, new), new, self.hidden.view(row, row + new))

    def _run_upper(self, new: int) -> np.ndarray:
        """Upper stack on hidden rows ``0 .. new-1``. Returns logits [new, V] (a view of the buffer)."""
        self.upper.run(self.hidden.view(0, new), new, self.logits.view(0, new))
        return self.logits.array[0, :new]


class TextStream:
    """Iterates text pieces of a running generation; ``result`` is complete once exhausted."""

    def __init__(self, steps: Iterator[list[int]], decoder: IncrementalDecoder, result: EngineResult) -> None:
        self._steps = steps
        self._decoder = decoder
        self.result = result

    def __iter__(self) -> Iterator[str]:
        for tokens in self._steps:
            piece = self._decoder.add(tokens)
            if piece:
                yield piece
        tail = self._decoder.flush()
        if tail:
            yield tail
        self.result.text = self._decoder.decode(self.result.tokens)


# ---- helpers -------------------------------------------------------------
def cut_at_eos(tokens: list[int], eos: frozenset[int]) -> tuple[list[int], bool]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1], True
    return tokens, False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def load_draft_vocab(folder: Path, manifest: Manifest) -> np.ndarray | None:
    """The draft vocabulary (int64 [V_d]) when ``V_d < V``; None when drafts cover every token."""
    sizes = manifest.sizes
    if sizes.draft_vocab_size == sizes.vocab_size:
        return None
    path = folder / DRAFT_VOCAB
    if not path.is_file():
        raise ExportFormatError(
            f"The manifest has a draft vocabulary of {sizes.draft_vocab_size} tokens but {path} is missing. "
            "Re-run `spaf-edge export`."
        )
    vocab = np.load(path, allow_pickle=False)
    if vocab.shape != (sizes.draft_vocab_size,) or vocab.min() < 0 or vocab.max() >= sizes.vocab_size:
        raise ExportFormatError(
            f"{path} holds {vocab.shape} ids, expected {sizes.draft_vocab_size} token ids in 0..{sizes.vocab_size - 1}. "
            "Re-run `spaf-edge export`."
        )
    return vocab.astype(np.int64)

