"""Engine rules judged in action space: epsilon acceptance, depth D, residual early exit (known answers)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rsd.engine.acceptance import strict_accept
from rsd.engine.action_space import (
    IntervalTailBound,
    action_distance,
    empirical_tail_bounds,
    epsilon_accept,
    latent_tail,
    normalized_decoder,
    pad_prefix,
)
from rsd.engine.rsd_engine import RSDInferenceEngine
from rsd.models.main_decoder import RFSQMainDecoder
from rsd.tokenizer.layout import layers_to_codes
from rsd.tokenizer.rfsq import RFSQTokenizer

L, P, V = 8, 128, 7

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------------- stubs with known answers
class _Cache:
    def __init__(self) -> None:
        self.length = 0

    def truncate(self, n: int) -> None:
        assert 0 <= n <= self.length
        self.length = n


class TableMain:
    """Greedy layer k is ``table[k]`` (one-hot logits x 5); layers ``>= uniform_from`` have flat logits."""

    num_layers, num_positions, num_levels = L, P, V

    def __init__(self, table: torch.Tensor, uniform_from: int = L) -> None:
        self.table, self.uniform_from, self.calls = table, uniform_from, 0

    def parameters(self):
        return iter([torch.zeros(1)])

    def new_cache(self, batch_size: int) -> _Cache:
        return _Cache()

    def _logits(self, b: int, k: int) -> torch.Tensor:
        if k >= self.uniform_from:
            return torch.zeros(b, P, V)
        return F.one_hot(self.table[k].expand(b, P), V).float() * 5.0

    def score(self, hidden, prefix, cache: _Cache) -> torch.Tensor:
        self.calls += 1
        k = 0 if prefix is None else prefix.shape[1]
        cache.length = k + 1
        return torch.stack([self._logits(hidden.shape[0], j) for j in range(k + 1)], 1)

    def extend(self, layers, cache: _Cache) -> torch.Tensor:
        self.calls += 1
        out = []
        for _ in range(layers.shape[1]):
            out.append(self._logits(layers.shape[0], cache.length))
            cache.length += 1
        return torch.stack(out, 1)


class FixedDraft:
    num_coarse_layers = 3

    def __init__(self, layers: torch.Tensor) -> None:
        self.layers = layers

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers.expand(hidden.shape[0], -1, -1).clone()


class IdentityTokenizer:
    """Hand-computable decode: latent ``z[t, d] = sum_k (c - 3) / 3 * 7**-k``; action ``[t, a] = z[t, a]``
    for ``a < 7`` (latents 7..15 are not used), in normalized units."""

    def decode_normalized(self, codes: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        n = codes.shape[-1] if num_layers is None else num_layers
        z = torch.zeros(codes.shape[:-1], dtype=torch.float64)
        for k in range(n):  # one add at a time: centre-level padding adds exact zeros, so the sum is bit-equal
            z = z + (codes[..., k].double() - 3) / 3 * 7.0 ** -k  # [B, 8, 16]
        return z[..., :7].float()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_normalized(codes) * 2.0  # "raw units": a different scale than normalized


def _table(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (L, P), generator=torch.Generator().manual_seed(seed))


def _moved(layer: torch.Tensor, pos: int, by: int) -> torch.Tensor:
    out = layer.clone()
    out[pos] = out[pos] + by if out[pos] + by < V else out[pos] - by
    return out


def _rfsq(seed: int = 0, mlp_scale: float = 0.05) -> RFSQTokenizer:
    """A small RFSQ tokenizer with an invertible linear path and a non-zero MLP (so GELU matters)."""
    torch.manual_seed(seed)
    tok = RFSQTokenizer(hidden_dim=32, mlp_depth=2).eval()
    tok.init_from_data(torch.rand(2048, 8, 7, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    with torch.no_grad():
        tok.decoder.mlp[-1].weight.normal_(0, mlp_scale, generator=torch.Generator().manual_seed(seed + 1))
    return tok


# ---------------------------------------------------------------------- epsilon rule
def test_epsilon_accept_against_a_hand_computed_decode():
    t = _table()
    main_layers = t[:3].unsqueeze(0)
    # layer 0: token 0 (chunk step 0, latent 0) one level off -> action moves by 1/3
    # layer 1: token 1 (latent 1) two levels off -> 2/3 * 1/7 = 0.0952
    # layer 2: token 10 (latent 10, not decoded into an action) three levels off -> 0
    drafted = torch.stack([_moved(t[0], 0, 1), _moved(t[1], 1, 2), _moved(t[2], 10, 3)]).unsqueeze(0)
    dec = normalized_decoder(IdentityTokenizer())
    expected = [1 / 3, 2 / 3 / 7, 0.0]
    for eps in (0.0, 0.09, 0.1, 0.34):
        got = epsilon_accept(drafted, main_layers, dec, eps, L, V)
        assert got.tolist() == [[e <= eps for e in expected]], eps
    assert strict_accept(drafted, main_layers).tolist() == [[False, False, False]]
    # the main model's own layers are at distance 0: strict acceptance implies epsilon acceptance
    assert epsilon_accept(main_layers, main_layers, dec, 0.0, L, V).all()


def test_epsilon_accept_matches_the_rfsq_prefix_decode():
    tok = _rfsq()
    g = torch.Generator().manual_seed(1)
    verified = torch.randint(0, V, (4, 3, P), generator=g)
    drafted = verified.clone()
    drafted[:, 0, :5] = (drafted[:, 0, :5] + 1) % V
    drafted[:, 1, 7:9] = (drafted[:, 1, 7:9] + 3) % V
    drafted[:, 2] = torch.randint(0, V, (4, P), generator=g)
    # reference: the tokenizer's own num_layers prefix decode (not the engine's centre padding)
    dists = torch.zeros(4, 3)
    for j in range(3):
        a = torch.full((4, L, P), 3)
        a[:, :j + 1] = drafted[:, :j + 1]
        m = a.clone()
        m[:, j] = verified[:, j]
        da = tok.decode_normalized(layers_to_codes(a), num_layers=j + 1)
        dm = tok.decode_normalized(layers_to_codes(m), num_layers=j + 1)
        dists[:, j] = action_distance(da, dm)
    assert (dists > 0).all()
    dec = normalized_decoder(tok)
    # the engine decodes all 24 candidates in one batch, the reference 4 at a time: the float32 decoder
    # rounds differently by batch shape (~1e-7 here), so a threshold is judged only where the distance is
    # more than 1e-5 from it; thresholds just above and just below every distance split the rest exactly
    for d in dists.flatten().tolist():
        for eps in (d - 1e-5, d + 1e-5, d):
            got = epsilon_accept(drafted, verified, dec, eps, L, V)
            clear = (dists - eps).abs() > 1e-5
            assert torch.equal(got[clear], (dists <= eps)[clear]), eps
            if eps != d:
                assert clear.any() and torch.equal(got, dists <= eps)  # distances are >= 1e-5 apart here


def test_pad_prefix_decodes_exactly_like_num_layers():
    tok = _rfsq()
    tokens = torch.randint(0, V, (5, L, P), generator=torch.Generator().manual_seed(2))
    for d in range(1, L + 1):
        padded = pad_prefix(tokens, d, V)
        assert (padded[:, d:] == 3).all() and torch.equal(padded[:, :d], tokens[:, :d])
        # bit equality: adding the centre level's exact 0.0 in float64 changes nothing
        assert torch.equal(tok.decode_normalized(layers_to_codes(padded)),
                           tok.decode_normalized(layers_to_codes(tokens), num_layers=d))


def test_engine_epsilon_mode_accepts_by_action_distance():
    t = _table(3)
    drafted = torch.stack([t[0], _moved(t[1], 2, 1), _moved(t[2], 0, 1)])  # distances 0, 1/21, 1/147
    tok = IdentityTokenizer()
    for eps, accepted in ((0.0, 1), (0.01, 1), (0.05, 3)):
        main = TableMain(t)
        eng = RSDInferenceEngine(main, FixedDraft(drafted), tok, mode="epsilon", epsilon=eps)
        out = eng.predict(torch.zeros(1, 4))
        assert out.accepted_length == accepted and out.main_calls == main.calls == 8 - accepted
        assert torch.equal(out.tokens[0, :accepted], drafted[:accepted])
        assert torch.equal(out.tokens[0, accepted:], t[accepted:])
        assert "check" in out.times
    with pytest.raises(ValueError, match="epsilon"):
        RSDInferenceEngine(TableMain(t), FixedDraft(drafted), tok, mode="epsilon")
    with pytest.raises(ValueError, match="decode_normalized"):
        RSDInferenceEngine(TableMain(t), FixedDraft(drafted), object(), mode="epsilon", epsilon=0.1)


# ---------------------------------------------------------------------- depth D
def test_depth_truncates_and_speculation_verifies_fewer_layers():
    t = _table(4)
    tok = IdentityTokenizer()
    full = RSDInferenceEngine(TableMain(t), tokenizer=tok, mode="baseline").predict(torch.zeros(1, 4))
    for d in (1, 2, 3, 5):
        main = TableMain(t)
        base = RSDInferenceEngine(main, tokenizer=tok, mode="baseline", depth=d).predict(torch.zeros(1, 4))
        assert base.main_calls == main.calls == d and base.depth.tolist() == [d]
        assert torch.equal(base.tokens[0, :d], full.tokens[0, :d]) and (base.tokens[0, d:] == 3).all()
        ref = tok.decode_normalized(layers_to_codes(full.tokens), num_layers=d) * 2.0
        assert torch.equal(base.actions[..., :6], ref[..., :6])  # same float64 sum, then the same scaling
        main = TableMain(t)
        spec = RSDInferenceEngine(main, FixedDraft(t[:3]), tok, mode="strict", depth=d)
        out = spec.predict(torch.zeros(1, 4))
        assert torch.equal(out.tokens, base.tokens)
        n = min(3, d - 1)  # at depth d only d-1 drafted layers are verified; the bonus layer completes it
        assert (out.drafted is None) if d == 1 else out.drafted.shape[1] == n
        assert out.main_calls == main.calls == d - n
    with pytest.raises(ValueError, match="depth"):
        RSDInferenceEngine(TableMain(t), mode="baseline", depth=9)
    eng = RSDInferenceEngine(TableMain(t), FixedDraft(t[:3]), mode="strict", draft_layers=1)
    out = eng.predict(torch.zeros(1, 4))
    assert out.drafted.shape[1] == 1 and out.main_calls == 7 and eng.stats.num_draft_layers == 1


# ---------------------------------------------------------------------- early exit
def test_bound_exit_stops_at_the_first_depth_the_given_bounds_allow():
    t = _table(5)
    bounds = [math.inf, 5.0, 4.0, 0.3, 0.2, 0.1, 0.05, 0.01, 0.0]
    for eps, want in ((0.25, 4), (0.1, 5), (0.3, 3), (0.0, 8), (10.0, 1)):
        main = TableMain(t)
        eng = RSDInferenceEngine(main, mode="baseline", early_exit="bound", exit_epsilon=eps, tail_bounds=bounds)
        out = eng.predict(torch.zeros(2, 4))
        assert out.depth.tolist() == [want, want] and out.main_calls == main.calls == want
        assert eng.stats.mean_depth == want and eng.stats.depth_counts[want] == 2
        spec = RSDInferenceEngine(TableMain(t), FixedDraft(t[:3]), mode="strict", early_exit="bound",
                                  exit_epsilon=eps, tail_bounds=bounds).predict(torch.zeros(2, 4))
        assert torch.equal(spec.tokens, out.tokens) and spec.depth.tolist() == [want, want]
        assert spec.main_calls == max(want - 3, 1)  # 3 drafted layers accepted, then steps up to the exit
    with pytest.raises(ValueError, match="tail_bounds"):
        RSDInferenceEngine(TableMain(t), mode="baseline", early_exit="bound", epsilon=0.1, tail_bounds=[1.0])
    with pytest.raises(ValueError, match="early_exit"):
        RSDInferenceEngine(TableMain(t), mode="baseline", early_exit="sometimes")


def test_interval_bound_is_sound_and_the_engine_stops_where_it_says():
    tok = _rfsq()
    bound = IntervalTailBound(tok)
    dec = normalized_decoder(tok)
    g = torch.Generator().manual_seed(6)
    prefix = torch.randint(0, V, (3, L, P), generator=g)
    assert latent_tail(L, V)[L] == 0.0 and latent_tail(L, V)[1] == pytest.approx(sum(7.0 ** -i for i in range(1, 8)))
    for d in range(1, L):
        r = bound(prefix, d)
        assert (torch.tensor(bound.floor[d], dtype=torch.float64) <= r).all()  # the skip test is a lower bound
        base = dec(pad_prefix(prefix, d, V))
        comps = [torch.randint(0, V, (3, L, P), generator=g) for _ in range(20)]
        comps += [torch.full((3, L, P), 0), torch.full((3, L, P), V - 1)]  # the extreme completions
        for c in comps:
            full = prefix.clone()
            full[:, d:] = c[:, d:]
            # tolerance 1e-5: the bound is float64 interval arithmetic, the decodes are float32
            assert (action_distance(dec(full), base).double() <= r + 1e-5).all()
    assert (bound(prefix, L) == 0).all()

    # the engine: exit at the first k whose bound for the baseline's prefix is <= exit_epsilon
    t = _table(7)
    ref = RSDInferenceEngine(TableMain(t), tokenizer=tok, mode="baseline").predict(torch.zeros(1, 4))
    rs = [float(bound(ref.tokens, k)) for k in range(1, L + 1)]
    eps = (rs[3] + rs[4]) / 2  # strictly between the bounds at depth 4 and 5
    want = next(k for k in range(1, L + 1) if rs[k - 1] <= eps)
    assert want == 5
    main = TableMain(t)
    out = RSDInferenceEngine(main, tokenizer=tok, mode="baseline", early_exit="bound",
                             exit_epsilon=eps).predict(torch.zeros(1, 4))
    assert out.depth.tolist() == [want] and main.calls == want
    # the guarantee: the full-depth baseline's (continuous) action is within eps of the exited one
    assert float(action_distance(dec(out.tokens), dec(ref.tokens))) <= eps + 1e-5


def test_chance_exit_drops_the_first_flat_layer():
    t = _table(8)
    for c in (2, 4):
        main = TableMain(t, uniform_from=c)
        out = RSDInferenceEngine(main, mode="baseline", early_exit="chance").predict(torch.zeros(1, 4))
        assert out.depth.tolist() == [c] and out.main_calls == main.calls == c + 1  # layer c computed, dropped
        assert torch.equal(out.tokens[0, :c], t[:c]) and (out.tokens[0, c:] == 3).all()
        spec_main = TableMain(t, uniform_from=c)
        spec = RSDInferenceEngine(spec_main, FixedDraft(t[:3]), mode="strict", early_exit="chance").predict(
            torch.zeros(1, 4))
        assert torch.equal(spec.tokens, out.tokens)
        # c=2: the verification call already shows layer 2 flat -> no further call
        assert spec.main_calls == (1 if c == 2 else 2)
    # a sharp but not one-hot distribution stays below the threshold: no exit
    assert RSDInferenceEngine(TableMain(t), mode="baseline", early_exit="chance").predict(
        torch.zeros(1, 4)).depth.tolist() == [8]


def test_empirical_tail_bounds_are_the_largest_seen_change():
    tok = _rfsq()
    dec = normalized_decoder(tok)
    tokens = torch.randint(0, V, (6, L, P), generator=torch.Generator().manual_seed(9))
    r = empirical_tail_bounds(dec, tokens, V, batch_size=6)  # one batch: the same computation as below
    assert len(r) == L + 1 and r[0] == math.inf and r[L] == 0.0
    for d in (1, 4, 7):
        assert r[d] == float(action_distance(dec(pad_prefix(tokens, d, V)), dec(tokens)).max())
    assert r[1] > r[4] > r[7] > 0
    # other batch sizes round the float32 decode differently (~1e-6 absolute): compare with that tolerance
    r4 = empirical_tail_bounds(dec, tokens, V, batch_size=4)
    assert r4[1:L] == pytest.approx(r[1:L], abs=1e-5)


# ---------------------------------------------------------------------- random-weight models
def test_strict_with_depth_and_exit_equals_baseline_on_random_models():
    torch.manual_seed(0)
    main = RFSQMainDecoder(input_dim=32, d_model=64, num_blocks=2, num_heads=4, ff_dim=128).eval()
    tok = _rfsq()
    hidden = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    kw = dict(depth=6, early_exit="bound", exit_epsilon=0.05)

    class Oracle:  # the main model's own greedy layers: every drafted layer is right
        num_coarse_layers = 3

        def propose(self, h):
            return RSDInferenceEngine(main, mode="baseline").predict(h).tokens[:, :3].clone()

    base = RSDInferenceEngine(main, tokenizer=tok, mode="baseline", **kw)
    strict = RSDInferenceEngine(main, Oracle(), tok, mode="strict", **kw)
    checked = 0
    for i in range(hidden.shape[0]):
        h = hidden[i:i + 1]
        ref = base.predict(h)
        with torch.inference_mode():  # teacher-forced logits: how close each greedy choice was to a tie
            logits = main(h, ref.tokens[:, :7])
        top2 = logits.topk(2, dim=-1).values
        gap = float((top2[..., 0] - top2[..., 1])[:, : int(ref.depth)].min())
        out = strict.predict(h)
        # exact equality only where no greedy choice is within 2e-5 of a tie (20x the float32 rounding of
        # these ~1 logits): the verification call and the single steps compute the same logits with
        # different matrix shapes
        if gap > 2e-5:
            checked += 1
            assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.depth, ref.depth)
            assert torch.equal(out.actions, ref.actions)
    assert checked >= 10  # most samples are checked (the rest have near-ties)
    assert strict.stats.acceptance_rate > 0.9
