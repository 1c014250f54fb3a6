"""Accelerated inference for :class:`rsd.engine.RSDInferenceEngine`: ``torch.compile`` / CUDA graphs.

At batch 1 the draft and the main decoder are launch-bound (hundreds of small kernels per chunk), so the
engine can run them through one of these modes (``RSDInferenceEngine(..., accelerate=mode)``,
``policy.accelerate`` in ``conf/eval.yaml``, ``--accelerate`` in the benchmarks):

- ``eager`` (default): the models as they are; :func:`accelerate_models` returns them unchanged.
- ``compile``: ``torch.compile(dynamic=False)`` of the draft's proposal (forward + argmax) and of the main
  decoder's ``score`` and ``extend`` (the per-step compute, KV-cache writes included). Shapes are fixed
  per call site, so there is one graph per (batch size, depth position, length): about 9 per batch size
  (score of layer 0 / of the verified layers, extend at positions 1..7), one more per verification length
  when the engine's ``depth`` or ``draft_layers`` shortens the verified prefix; dynamo's recompile limit
  is raised to 64 for that. On CUDA ``mode="reduce-overhead"`` (inductor's CUDA graphs): the main decoder's
  KV cache is then one persistent buffer per batch size (``new_cache`` resets it; marked static so the
  graphs may write into it), and outputs are cloned out of the graphs' memory. On CPU ``mode="default"``
  (inductor's C++ code: needs a C++ compiler). The first call of every shape compiles (seconds each).
- ``cuda_graph``: an explicit ``torch.cuda.CUDAGraph`` of the draft's proposal, captured at the first call
  of each input shape (batch 1 in practice) with static input/output buffers and replayed afterwards.
  Only the draft: the main decoder runs eagerly in this mode (its KV-cache steps change position and
  length every call). CUDA only.

Fallback: whatever fails, at setup (cuda_graph without CUDA, no dynamo) or at a call (no C++ compiler,
capture error), switches *all* the accelerated parts back to eager with ONE ``RuntimeWarning`` that says
why; the failing call is then recomputed eagerly. The first accelerated draft call is also checked against
the eager one and falls back when more than 1 % of the tokens differ (a broken graph; a few flips are
float rounding, e.g. bf16 near-ties, and are counted in ``info["draft_check"]``). ``info`` (also
``engine.accelerate_info``) records what is in use: ``{"requested", "mode", "draft", "main", "fallback"}``
(+ ``draft_check``); it is updated in place. In float32 the tokens equal eager's (tested on CPU).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch

from rsd.tokenizer.layout import layers_to_codes

ACCELERATE_MODES = ("eager", "compile", "cuda_graph")


class _Fallback:
    """Shared state of one :func:`accelerate_models` call: active until the first failure."""

    def __init__(self, info: dict) -> None:
        self.info = info
        self.active = True

    def fail(self, reason: str) -> None:
        if not self.active:
            return
        self.active = False
        requested = self.info["requested"]
        self.info.update(mode="eager", draft="eager" if self.info["draft"] != "none" else "none",
                         main="eager", fallback=reason)
        warnings.warn(f"accelerate={requested!r} is not used, falling back to eager: {reason}",
                      RuntimeWarning, stacklevel=2)

    def call(self, name: str, fast: Callable, slow: Callable, *args):
        if self.active:
            try:
                return fast(*args)
            except Exception as exc:  # noqa: BLE001 - any failure means eager, with the reason
                self.fail(f"{name} failed: {_reason(exc)}")
        return slow(*args)


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of an exception and of the innermost exception it wraps (compile errors nest)."""
    def line(e: BaseException) -> str:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".strip()[:300]

    inner = exc
    for _ in range(10):  # BackendCompilerFailed keeps the backend's error in .inner_exception
        nxt = getattr(inner, "inner_exception", None) or inner.__cause__
        if not isinstance(nxt, BaseException) or nxt is inner:
            break
        inner = nxt
    return line(exc) if inner is exc else f"{line(exc)} <- {line(inner)}"


def _eager_propose(draft) -> Callable[[torch.Tensor], torch.Tensor]:
    if hasattr(draft, "propose"):
        return draft.propose
    return lambda hidden: draft(hidden).argmax(-1)


def _cloned_from_cudagraphs(fn: Callable) -> Callable:
    """``fn`` compiled with ``mode="reduce-overhead"``: new step per call, output copied out of graph memory."""

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args).clone()  # the next replay overwrites the graph's output

    return run


class _GraphedFn:
    """``fn(x) -> tensor`` replayed from a ``torch.cuda.CUDAGraph`` captured once per input shape/dtype."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 3) -> None:
        self.fn = fn
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def _capture(self, x: torch.Tensor):
        with torch.inference_mode(False):  # a normal tensor: copy_ into it works in and out of inference mode
            static_in = torch.empty_like(x)
        static_in.copy_(x)
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # warm-up (lazy init, autotuning) off the capture
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(static_in)
        return static_in, static_out, graph

    def __call__(self, x: torch.Tensor):
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        static_in, static_out, graph = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        if isinstance(static_out, tuple):
            return tuple(t.clone() for t in static_out)
        return static_out.clone()  # the next replay overwrites static_out


class AcceleratedDraft:
    """The draft with an accelerated ``propose``; other attributes come from the wrapped draft.

    The first call is checked against the eager draft: more than ``max_differ`` (a fraction) of differing
    tokens means a broken acceleration (fallback). A few flips are float rounding of fused kernels (bf16
    near-ties); their count is recorded in ``info["draft_check"]``.
    """

    def __init__(self, draft, fast: Callable, fallback: _Fallback, verify_first: bool = True,
                 max_differ: float = 0.01) -> None:
        self.draft = draft
        self.max_differ = max_differ
        self._fast = fast
        self._slow = _eager_propose(draft)
        self._fallback = fallback
        self._verified = not verify_first

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self._fallback.call("the draft", self._fast, self._slow, hidden)
        if not self._verified and self._fallback.active:
            self._verified = True
            ref = self._slow(hidden)
            differ = int((out.long() != ref.long()).sum()) if out.shape == ref.shape else ref.numel()
            self._fallback.info["draft_check"] = f"{differ} of {ref.numel()} tokens differ from eager at the first call"
            if differ > self.max_differ * ref.numel():
                self._fallback.fail(f"the accelerated draft's tokens differ from the eager draft's ({differ} of "
                                    f"{ref.numel()})")
                return ref
        return out

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.draft(hidden)

    def __getattr__(self, name: str):
        if name == "draft":  # not set yet (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.draft, name)


class AcceleratedMain:
    """The main decoder with compiled ``score`` / ``extend``; other attributes come from the wrapped one.

    ``static_cache``: ``new_cache`` returns one persistent cache per batch size (reset to length 0, its
    tensors marked static for CUDA graphs). The engine uses one cache per chunk, so this is safe there;
    do not hold two caches of the same batch size at once.
    """

    def __init__(self, main, score: Callable, extend: Callable, fallback: _Fallback,
                 static_cache: bool = False) -> None:
        self.main = main
        self._score = score
        self._extend = extend
        self._fallback = fallback
        self._static_cache = static_cache
        self._caches: dict[int, object] = {}

    def new_cache(self, batch_size: int, device=None, dtype=None):
        if not self._static_cache or device is not None or dtype is not None:
            return self.main.new_cache(batch_size, device, dtype)
        cache = self._caches.get(batch_size)
        if cache is None:
            with torch.inference_mode(False):  # normal tensors: static addresses across inference calls
                cache = self.main.new_cache(batch_size)
            for t in (*cache.keys, *cache.values):
                t.zero_()
                try:
                    torch._dynamo.mark_static_address(t)
                except Exception:  # noqa: BLE001 - then inductor only skips its CUDA graphs for the main
                    pass
            self._caches[batch_size] = cache
        cache.length = 0
        return cache

    def score(self, hidden: torch.Tensor, layers_prefix: torch.Tensor | None, cache) -> torch.Tensor:
        return self._fallback.call("the main decoder's score", self._score, self.main.score,
                                   hidden, layers_prefix, cache)

    def extend(self, layers: torch.Tensor, cache) -> torch.Tensor:
        return self._fallback.call("the main decoder's extend", self._extend, self.main.extend,
                                   layers, cache)

    def __call__(self, *args, **kwargs):
        return self.main(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "main":  # not set yet (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.main, name)


def _device_of(model, default: torch.device) -> torch.device:
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    return params[0].device if params else default


def accelerate_models(draft, main, mode: str = "eager", device: torch.device | str | None = None,
                      compile_options: dict | None = None):
    """``(draft, main)`` -> ``(draft_like, main_like, info)`` for ``mode`` in :data:`ACCELERATE_MODES`.

    ``draft`` may be ``None`` (baseline engines). ``eager`` returns the models themselves. The returned
    objects keep the engine's API (``propose``; ``new_cache`` / ``score`` / ``extend``) and fall back to
    eager as described in the module docstring. ``compile_options`` are passed to ``torch.compile``
    (e.g. ``{"backend": "aot_eager"}``); they replace the default ``mode``.
    """
    if mode not in ACCELERATE_MODES:
        raise ValueError(f"accelerate must be one of {ACCELERATE_MODES}, got {mode!r}")
    device = torch.device(device) if device is not None else _device_of(main, torch.device("cpu"))
    info = {"requested": mode, "mode": mode, "draft": "eager" if draft is not None else "none", "main": "eager",
            "fallback": None}
    if mode == "eager":
        return draft, main, info
    fallback = _Fallback(info)
    on_cuda = device.type == "cuda"

    if mode == "cuda_graph":
        if not on_cuda or not torch.cuda.is_available():
            fallback.fail(f"cuda_graph needs a CUDA device, the models run on {device.type}"
                          + ("" if torch.cuda.is_available() else " (torch.cuda.is_available() is False)"))
            return draft, main, info
        if draft is None:
            info.update(mode="eager", fallback="cuda_graph accelerates only the draft, and there is none")
            return draft, main, info
        info["draft"] = "cuda_graph"
        return AcceleratedDraft(draft, _GraphedFn(_eager_propose(draft)), fallback), main, info

    # compile
    try:
        dynamo = importlib.import_module("torch._dynamo")
        if not dynamo.is_dynamo_supported():
            raise RuntimeError("torch.compile (dynamo) is not supported on this Python/platform")
        limit = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo.config, limit, max(getattr(dynamo.config, limit), 64))
        options = dict(compile_options) if compile_options else {"mode": "reduce-overhead" if on_cuda else "default"}
        options.setdefault("dynamic", False)
        cudagraphs = on_cuda and options.get("mode") == "reduce-overhead"

        def compiled(fn: Callable) -> Callable:
            fn = torch.compile(fn, **options)
            return _cloned_from_cudagraphs(fn) if cudagraphs else fn

        what = f"compile({', '.join(f'{k}={v}' for k, v in options.items() if k != 'dynamic')})"
        draft_like = draft
        if draft is not None:
            draft_like = AcceleratedDraft(draft, compiled(_eager_propose(draft)), fallback)
            info["draft"] = what
        main_like = main
        if all(hasattr(main, a) for a in ("score", "extend", "new_cache")):
            main_like = AcceleratedMain(main, compiled(main.score), compiled(main.extend), fallback,
                                        static_cache=cudagraphs)
            info["main"] = what
    except Exception as exc:  # noqa: BLE001
        fallback.fail(f"torch.compile setup failed: {_reason(exc)}")
        return draft, main, info
    return draft_like, main_like, info


# ---------------------------------------------------------------------- the light head as one function
LIGHT_HEAD_MODES = ("eager", "compile", "cuda_graph")


class LightHead:
    """The light-head design's whole decode as ONE function: ``hidden [B, D] -> (tokens [B, 8, 128], actions
    [B, 8, 7])`` = the main decoder's 8 greedy steps (``score`` + 7 ``extend``, a preallocated KV cache per batch
    size, positions fixed in the code) + RFSQ decode (``dequantize`` -> ``decode_latent`` -> ``unnormalize``) +
    gripper binarization: what ``RSDInferenceEngine(mode="baseline")`` computes, with no host synchronization
    (the code range check of ``RFSQTokenizer.decode`` is skipped: argmax codes are in range by construction).

    ``mode``: ``eager``; ``compile`` (``torch.compile(dynamic=False)`` of the function; on CUDA
    ``mode="reduce-overhead"``: inductor's CUDA graphs); ``cuda_graph`` (the function captured as one
    ``torch.cuda.CUDAGraph`` per input shape and replayed; CUDA only, else eager with the reason in
    ``info["fallback"]``). A failing accelerated call falls back to eager (``info["fallback"]``). Baseline decoding
    only: speculation's accepted length is data-dependent control flow (one graph per outcome would be needed),
    and in this design it saves at most the ~0.15 ms of a few small steps (issue 21).
    """

    def __init__(self, main, tokenizer, mode: str = "eager", gripper_dim: int | None = 6,
                 compile_options: dict | None = None) -> None:
        if mode not in LIGHT_HEAD_MODES:
            raise ValueError(f"mode must be one of {LIGHT_HEAD_MODES}, got {mode!r}")
        self.main, self.tokenizer, self.gripper_dim = main, tokenizer, gripper_dim
        self.num_layers = int(getattr(main, "num_layers", 8))
        self.info = {"requested": mode, "mode": mode, "fallback": None}
        self._caches: dict[int, object] = {}
        self._fn = self.decode_eager
        device = _device_of(main, torch.device("cpu"))
        if mode == "cuda_graph":
            if device.type != "cuda" or not torch.cuda.is_available():
                self._fail(f"cuda_graph needs a CUDA device, the main decoder runs on {device.type}")
            else:
                self._fn = _GraphedFn(self.decode_eager)
        elif mode == "compile":
            options = dict(compile_options) if compile_options else {
                "mode": "reduce-overhead" if device.type == "cuda" else "default"}
            options.setdefault("dynamic", False)
            fn = torch.compile(self.decode_eager, **options)
            if device.type == "cuda" and options.get("mode") == "reduce-overhead":
                def run(hidden, _fn=fn):
                    torch.compiler.cudagraph_mark_step_begin()
                    return tuple(t.clone() for t in _fn(hidden))
                self._fn = run
            else:
                self._fn = fn

    def _fail(self, reason: str) -> None:
        self.info.update(mode="eager", fallback=reason)
        self._fn = self.decode_eager

    def _cache(self, batch_size: int):
        cache = self._caches.get(batch_size)
        if cache is None:
            with torch.inference_mode(False):  # normal tensors: static addresses across inference calls
                cache = self.main.new_cache(batch_size)
            for t in (*cache.keys, *cache.values):
                t.zero_()
                try:
                    torch._dynamo.mark_static_address(t)
                except Exception:  # noqa: BLE001 - then inductor only skips its CUDA graphs
                    pass
            self._caches[batch_size] = cache
        return cache

    def decode_eager(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cache(hidden.shape[0])
        cache.length = 0
        token = self.main.score(hidden, None, cache)[:, 0].argmax(-1)
        layers = [token]
        for _ in range(1, self.num_layers):
            token = self.main.extend(token.unsqueeze(1), cache)[:, 0].argmax(-1)
            layers.append(token)
        tokens = torch.stack(layers, dim=1)
        tok = self.tokenizer
        z = tok.quantizer.dequantize(layers_to_codes(tokens).to(tok.normalizer.q01.device), None,
                                     dtype=tok.decoder.linear.weight.dtype)
        actions = tok.normalizer.unnormalize(tok.decode_latent(z))
        if self.gripper_dim is not None:
            g = actions[..., self.gripper_dim]
            actions = torch.cat([actions[..., :self.gripper_dim], torch.where(g > 0, 1.0, -1.0).to(actions.dtype)
                                 .unsqueeze(-1), actions[..., self.gripper_dim + 1:]], dim=-1)
        return tokens, actions

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._cache(hidden.shape[0])  # allocated outside the compiled / captured function
        if self._fn is not self.decode_eager:
            try:
                return self._fn(hidden)
            except Exception as exc:  # noqa: BLE001 - no compiler, capture error, ...: eager, with the reason
                self._fail(f"the light head failed: {_reason(exc)}")
        return self.decode_eager(hidden)
