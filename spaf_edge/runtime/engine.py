"""The on-device SpAF engine: an export folder run with ONNX Runtime, no torch (DESIGN §6).

``Engine.from_folder`` checks the manifest (and every file's sha256), opens the four
graphs on the chosen execution provider with the shared weights loaded once, checks
their IO against the manifest, preallocates the KV caches and binds them in place.
``generate`` / ``stream`` run :class:`spaf_edge.runtime.decoder.Decoder`. Decoding
settings left unset come from the manifest: its ``tuned`` entry over its ``spaf`` one
(with the provider's floors for the export's precision, ``precision_defaults``).

Batch 1, one generation at a time per engine (the KV caches are the engine's): a stream
that is still open when another generation starts raises if iterated further.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spaf_edge.core.errors import ConfigError, ContextLengthError, ExportFormatError
from spaf_edge.core.io_names import (
    ADAPTER_KV,
    DRAFT_HEAD_GRAPH,
    DRAFT_VOCAB,
    DRAFTER_GRAPH,
    EMBEDDINGS,
    GRAPHS,
    LOWER_GRAPH,
    TOKENIZER,
    UPPER_GRAPH,
)
from spaf_edge.core.manifest import Manifest
from spaf_edge.core.sampling import SamplingParams
from spaf_edge.core.shared_weights import SharedWeights
from spaf_edge.core.stats import GenerationStats
from spaf_edge.decoding.loop import DecodeResult, DecodeSettings, resolve_settings
from spaf_edge.decoding.proposers import LookupProposer, Proposers
from spaf_edge.decoding.spaf import SpAFProposer
from spaf_edge.runtime.buffers import HostBuffers
from spaf_edge.runtime.decoder import Decoder
from spaf_edge.runtime.drafting import EngineDraftCalls
from spaf_edge.runtime.embeddings import EmbeddingTable
from spaf_edge.runtime.graphs import (
    DrafterGraph,
    DraftHeadGraph,
    LowerGraph,
    UpperGraph,
)
from spaf_edge.runtime.kv import KVCache
from spaf_edge.runtime.precision_defaults import precision_defaults
from spaf_edge.runtime.rows import (
    MAX_ROWS,
    ROW_CALLS,
    TREE_MODES,
    RowCheck,
    check_rows,
    check_tree,
    probe_tokens,
)
from spaf_edge.runtime.session import (
    Provider,
    check_thread_pool,
    default_threads,
    open_shared_session,
    release_freed_memory,
    resolve_provider,
    session_options,
)
from spaf_edge.runtime.signatures import check_graphs
from spaf_edge.runtime.stream import IncrementalDecoder
from spaf_edge.runtime.tokenizer import TextTokenizer

DECODING_KEYS = (
    "num_draft_tokens", "serial_parallel_transition", "draft_stop_threshold", "temperature", "top_p", "top_k",
    "proposers", "tree_width", "lookup_branches", "lookup_depth", "lookup_start", "lookup_min_match", "max_nodes",
    "min_drafts",
)
PREFILL_CHUNK = 64  # prompt positions per prefill call (rows of the hidden-state buffers)
LOGIT_ROWS = 8  # initial rows of the logits buffer: a verify pass of up to 7 drafts (grown for more)


class Engine:
    """Build with :meth:`from_folder`; then :meth:`generate` or :meth:`stream`."""

    def __init__(
        self, folder: Path, manifest: Manifest, provider: Provider, decoder: Decoder, tokenizer: TextTokenizer | None,
        thread_pool: str = "session",
    ) -> None:
        self.folder = folder
        self.thread_pool = thread_pool  # "session" | "global" (spaf_edge.runtime.session.session_options)
        self.manifest = manifest
        self.provider = provider
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.vocab_size = manifest.sizes.vocab_size
        self.eos = decoder.eos
        self._generation = 0  # bumped by every start; an older stream notices and stops
        self.rows: RowCheck | None = None  # set by from_folder: the stacks' row invariance on this device
        self.tree_exact = False  # set by from_folder: tree nodes get their chains' bits on this device

    @property
    def max_length(self) -> int:
        """Context positions a generation may use: the export's minus the rows padding writes past a call."""
        return self.decoder.max_length

    @property
    def lossless(self) -> str:
        """``exact`` when SpAF's tokens are provably plain decoding's on this device, else ``near``."""
        if self.rows is None or (self.decoder is not None and self.decoder.proposer.trees and not self.tree_exact):
            return "near"
        return self.rows.lossless

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        verify: bool = True,
        prefill_chunk: int = PREFILL_CHUNK,
        thread_pool: str | None = None,
        row_calls: str = "auto",
        trees: str = "auto",
    ) -> Engine:
        """Load an export folder: manifest (+ sha256 of every file with ``verify``), graphs, tokenizer.

        ``thread_pool``: ``"session"`` or ``"global"`` (ONNX Runtime's process-wide pool: faster
        with several threads, but every later session of the process must use it), default the
        process default (``"session"``; the CLI sets ``"global"``). See
        :func:`spaf_edge.runtime.session.session_options`. ``row_calls``: how one-row stack calls
        run, ``auto`` (measured at load, :func:`spaf_edge.runtime.rows.check_rows`), ``native`` or
        ``padded``. ``trees``: verify draft trees where this device gives a tree's nodes their
        chains' bits (``auto``, measured at load by :func:`spaf_edge.runtime.rows.check_tree`),
        never (``off``: chains, one proposer's per step), or also where it does not (``near``:
        for measurements; the engine then reports ``lossless: near``).
        """
        if row_calls not in ROW_CALLS:
            raise ConfigError(f"Invalid row_calls={row_calls!r}: expected one of {', '.join(ROW_CALLS)}.")
        if trees not in TREE_MODES:
            raise ConfigError(f"Invalid trees={trees!r}: expected one of {', '.join(TREE_MODES)}.")
        thread_pool = check_thread_pool(thread_pool)
        for name, value in (("threads", threads), ("prefill_chunk", prefill_chunk)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"Invalid {name}={value!r}: expected an integer >= 1.")
        cores = default_threads()
        if threads is not None and threads > cores:
            # More threads than cores only wait on each other (300x slower measured): cap, and say so.
            warnings.warn(f"threads={threads} is more than the {cores} usable cores; using {cores}.",
                          RuntimeWarning, stacklevel=2)
            threads = cores
        folder = Path(path)
        manifest = Manifest.load(folder, verify_files=verify)
        chosen = resolve_provider(provider)
        sizes = manifest.sizes
        dtype = np.float16 if manifest.dtype == "float16" else np.float32
        # Each loading step leaves freed heap behind (the tokenizer's JSON parse ~17 MB, each session's
        # unpacked weights): handing it back before the next step keeps it out of the load's peak RSS.
        tokenizer = load_tokenizer(folder, manifest)
        release_freed_memory()
        sessions = open_sessions(folder, manifest, chosen, threads, dtype, thread_pool)
        buffers = HostBuffers(
            max(prefill_chunk, LOGIT_ROWS), LOGIT_ROWS, sizes.hidden_size, sizes.vocab_size, sizes.draft_vocab_size,
            dtype,
        )

        def cache(layers: range) -> KVCache:
            return KVCache(layers, sizes.num_kv_heads, sizes.head_dim, sizes.max_length, dtype, chosen.device)

        k = manifest.cutoff_layer
        attention = manifest.adapter_attention
        adapter_kv = None
        if attention:  # the attending adapter's own cache, beside the stacks'
            adapter_kv = KVCache([ADAPTER_KV], attention["num_heads"], attention["head_dim"], sizes.max_length, dtype,
                                 chosen.device)
        decoder = Decoder(
            LowerGraph(sessions[LOWER_GRAPH], cache(range(0, k))),
            UpperGraph(sessions[UPPER_GRAPH], cache(range(k, sizes.num_layers))),
            EmbeddingTable(folder / EMBEDDINGS, sizes.vocab_size, sizes.hidden_size, dtype, manifest.quantization),
            buffers, sizes.vocab_size, frozenset(manifest.eos_token_ids), prefill_chunk,
        )
        spaf = SpAFProposer(EngineDraftCalls(
            decoder,
            DrafterGraph(sessions[DRAFTER_GRAPH]),
            DraftHeadGraph(sessions[DRAFT_HEAD_GRAPH], buffers.draft_logits_value, manifest.reads_top_state,
                           adapter_kv),
            load_draft_vocab(folder, manifest),
        ))
        decoder.proposer = Proposers(spaf, LookupProposer(lambda: decoder.tokens), trees=False)  # see check_tree
        engine = cls(folder, manifest, chosen, decoder, tokenizer, thread_pool)
        engine.rows = check_rows(decoder, row_calls)
        engine.tree_exact = trees != "off" and check_tree(decoder)
        decoder.proposer.trees = decoder.verifies_trees and (trees == "near" or engine.tree_exact)
        check_drafts(decoder, folder)
        release_freed_memory()  # what the load-time checks freed
        return engine

    # ---- settings -------------------------------------------------------
    @property
    def untuned_defaults(self) -> dict[str, Any]:
        """Decoding defaults without a ``tuned`` entry: the SpAF config, with this provider's
        floors for the export's precision (:mod:`spaf_edge.runtime.precision_defaults`), and
        where one-row calls are padded to two rows, a first draft kept whatever its probability:
        the padding row would compute nothing useful in its place."""
        spaf = self.manifest.spaf
        merged = {**spaf, **precision_defaults(self.provider.name, self.manifest.quantization, spaf)}
        if self.decoder is not None and self.decoder.pad:
            merged["min_drafts"] = 1
        return {key: merged[key] for key in DECODING_KEYS if key in merged}

    @property
    def defaults(self) -> dict[str, Any]:
        """Decoding defaults: the manifest's ``tuned`` settings over :attr:`untuned_defaults`."""
        tuned = {key: value for key, value in (self.manifest.tuned or {}).items() if key in DECODING_KEYS}
        return {**self.untuned_defaults, **tuned}

    def settings(
        self,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        num_draft_tokens: int | None = None,
        serial_parallel_transition: int | None = None,
        draft_stop_threshold: float | None = None,
        mode: str = "spaf",
        **tree: Any,
    ) -> DecodeSettings:
        """Resolve unset options from :attr:`defaults` and validate them (ConfigError).

        ``tree``: ``proposers``, ``tree_width``, ``lookup_branches``, ``max_nodes``
        (:func:`spaf_edge.decoding.loop.resolve_settings`).
        """
        self._check_open()
        settings = resolve_settings(self.defaults, temperature, top_p, top_k, num_draft_tokens,
                                    serial_parallel_transition, draft_stop_threshold, mode, **tree)
        rows = self.decoder.call_rows(settings)[1]
        if rows > MAX_ROWS:
            raise ConfigError(
                f"These settings verify up to {rows} rows in one call (num_draft_tokens "
                f"{settings.num_draft_tokens}, lookup_depth {settings.lookup_depth}, max_nodes {settings.max_nodes}); "
                f"the engine verifies at most {MAX_ROWS}, the widest call its load-time check compares bit for bit. "
                f"Lower them to at most {MAX_ROWS - 1}."
            )
        return settings

    def _check_open(self) -> None:
        if self.decoder is None:
            raise ConfigError(f"This engine of {self.folder} was closed; load it again with Engine.from_folder.")

    # ---- text -----------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], chat: bool = True, special_tokens: bool = False) -> list[int]:
        """Prompt text (through the chat template when ``chat``) or token ids -> token ids.

        Special-token strings in the text are plain text unless ``special_tokens`` (then e.g. a
        ``<|im_end|>`` in it ends the user's turn).
        """
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.folder} has no {TOKENIZER}; pass the prompt as token ids.")
            return self.tokenizer.encode_prompt(prompt, chat=chat, special_tokens=special_tokens)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError(f"Token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1}.")
        return ids

    def decode(self, tokens: Sequence[int]) -> str | None:
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else None

    # ---- generation -----------------------------------------------------
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
        special_tokens: bool = False,
        **tree: Any,
    ) -> DecodeResult:
        """Generate up to ``max_new_tokens`` tokens; unset options come from :attr:`defaults`.

        ``mode="greedy"`` is plain decoding (one full pass per token, no drafts; it samples
        when ``temperature > 0``). ``reuse_cache`` keeps the KV rows of the previous
        generation's tokens that the new prompt starts with (multi-turn chat). ``special_tokens``
        lets special-token strings in a text prompt act as control tokens (see :meth:`encode`).
        ``tree``: which proposers draft and the tree's shape (:meth:`settings`).
        """
        settings = self.settings(temperature, top_p, top_k, num_draft_tokens, serial_parallel_transition,
                                 draft_stop_threshold, mode, **tree)
        result, steps = self._start(prompt, max_new_tokens, seed, chat, reuse_cache, settings, special_tokens)
        for _ in steps:
            pass
        result.text = self.decode(result.tokens)
        return result

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, **options: Any) -> TextStream:
        """Like :meth:`generate`, iterating text pieces as tokens are committed; ``.result`` at the end."""
        if self.tokenizer is None:
            raise ConfigError(f"{self.folder} has no {TOKENIZER}: streaming text needs one; use generate().")
        seed, chat, reuse = options.pop("seed", None), options.pop("chat", True), options.pop("reuse_cache", False)
        special_tokens = options.pop("special_tokens", False)
        result, steps = self._start(prompt, max_new_tokens, seed, chat, reuse, self.settings(**options),
                                    special_tokens)
        return TextStream(steps, IncrementalDecoder(self.tokenizer.decode), result)

    def _start(
        self, prompt, max_new_tokens: int, seed: int | None, chat: bool, reuse_cache: bool, settings: DecodeSettings,
        special_tokens: bool = False,
    ) -> tuple[DecodeResult, Iterator[list[int]]]:
        """Validate eagerly (errors surface at the call, not at the first iteration)."""
        self._check_open()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"Invalid max_new_tokens={max_new_tokens!r}: expected an integer >= 1.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"Invalid seed={seed!r}: expected an integer >= 0 or None.")
        prompt_ids = self.encode(prompt, chat, special_tokens)
        if not prompt_ids:
            raise ContextLengthError("The prompt is empty; give at least one token.")
        if len(prompt_ids) > self.max_length:
            raise ContextLengthError(
                f"The prompt has {len(prompt_ids)} tokens but the export's context is {self.max_length} "
                "tokens. Shorten the prompt, or re-export with a larger --max-length."
            )
        result = DecodeResult(tokens=[], stats=GenerationStats(prompt_tokens=len(prompt_ids)), prompt_ids=prompt_ids)
        self._generation += 1
        steps = self.decoder.steps(prompt_ids, max_new_tokens, settings, np.random.default_rng(seed), result,
                                   reuse_cache)
        return result, self._exclusive(steps, self._generation)

    def _exclusive(self, steps: Iterator[list[int]], generation: int) -> Iterator[list[int]]:
        for new in steps:
            yield new
            if generation != self._generation:
                raise RuntimeError("Another generation started on this engine; this stream cannot continue.")

    # ---- lifetime -------------------------------------------------------
    def close(self) -> None:
        """Release the sessions, KV caches and open files now; the engine cannot generate after it.

        Dropping the last reference frees them too, but keeps the freed heap in the process
        (see :func:`spaf_edge.runtime.session.release_freed_memory`); ``close`` returns it.
        """
        if self.decoder is None:
            return
        self.decoder.embeddings.close()
        self.decoder.proposer = None  # its draft calls point back at the decoder: no cycle left for the GC
        self.decoder = None
        release_freed_memory()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TextStream:
    """Iterates text pieces of a running generation; ``result`` is complete once exhausted."""

    def __init__(self, steps: Iterator[list[int]], decoder: IncrementalDecoder, result: DecodeResult) -> None:
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


def open_sessions(
    folder: Path, manifest: Manifest, provider: Provider, threads: int | None, dtype: type, thread_pool: str
) -> dict[str, Any]:
    """The graphs' sessions on the shared weights (mapped once), checked against the manifest."""
    shared = SharedWeights(folder)
    sessions = {}
    for name in GRAPHS:
        sessions[name] = open_shared_session(shared, name, session_options(threads, thread_pool), provider)
        release_freed_memory()
    check_graphs(folder, manifest, dtype, sessions)
    return sessions


def load_tokenizer(folder: Path, manifest: Manifest) -> TextTokenizer | None:
    """The export's tokenizer, or None for a folder without one (token-id prompts only)."""
    if not (folder / TOKENIZER).is_file():
        return None
    return TextTokenizer.from_folder(folder, manifest.chat_template)


def check_drafts(decoder: Decoder, folder: Path) -> None:
    """ExportFormatError when the draft graphs give non-finite logits on a short prompt.

    Sampling stays exact whatever a drafter gives (an invalid ``q`` is rejected), but NaN or
    inf here means corrupt weights in a folder whose hashes were re-sealed, so say so at load.
    """
    length = min(6, decoder.lower.kv.max_length - 2)
    if length < 2:  # no room for a prompt and a draft
        return
    proposer = decoder.proposer.spaf
    decoder.prefill(probe_tokens(decoder.vocab_size, length), active=True)
    try:
        proposer.propose(2, DecodeSettings(SamplingParams(), 2, 0, None, "spaf"), np.random.default_rng(0))
        finite = bool(np.isfinite(decoder.buffers.draft_logits).all())
    finally:
        decoder.reset()
    if not finite:
        raise ExportFormatError(
            f"The draft graphs of {folder} give NaN or inf logits: their weights are corrupt. "
            "Re-run `spaf-edge export`."
        )


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
    try:
        vocab = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # not an .npy array of numbers (e.g. a pickle)
        raise ExportFormatError(f"{path} is not a saved id array ({exc}). Re-run `spaf-edge export`.") from exc
    if (vocab.dtype.kind not in "iu" or vocab.shape != (sizes.draft_vocab_size,) or vocab.min() < 0
            or vocab.max() >= sizes.vocab_size):
        raise ExportFormatError(
            f"{path} holds {vocab.shape} ids, expected {sizes.draft_vocab_size} token ids in "
            f"0..{sizes.vocab_size - 1}. Re-run `spaf-edge export`."
        )
    return vocab.astype(np.int64)
