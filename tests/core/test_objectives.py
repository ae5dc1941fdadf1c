"""Training objectives: each value and gradient against a plain-loop derivation, mixes, specs."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from speculators_core import Objective, PluginHost, SpeculatorsError, hookimpl
from speculators_core.objectives import (
    BUILTIN_OBJECTIVES,
    LK_ETA,
    TargetDistribution,
    parse_objective_spec,
    resolve_objective,
)
from speculators_core.plugins import PluginSettings

N, V = 4, 7


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _plain(name: str, z: list[float], t: list[float]) -> tuple[float, list[float]]:
    """Loss and d loss / d z of one position, by hand: the value from its definition, the
    gradient as d loss / d q (derived per objective) through the softmax Jacobian
    ``d q_i / d z_j = q_i ([i = j] - q_j)``."""
    q, p = _softmax(z), _softmax(t)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    alpha = sum(min(a, b) for a, b in zip(p, q))
    star = max(range(V), key=lambda i: t[i])
    below = [1.0 if q[i] < p[i] else 0.0 for i in range(V)]  # d alpha / d q_i
    kl = sum(p[i] * math.log(p[i] / q[i]) for i in range(V))
    lam = math.exp(-LK_ETA * alpha)
    if name == "kl":
        value, g = kl, [-p[i] / q[i] for i in range(V)]
    elif name == "rkl":
        value = sum(q[i] * math.log(q[i] / p[i]) for i in range(V))
        g = [math.log(q[i] / p[i]) + 1 for i in range(V)]
    elif name == "jsd":
        value = 0.5 * sum(
            p[i] * math.log(p[i] / m[i]) + q[i] * math.log(q[i] / m[i]) for i in range(V)
        )
        g = [0.5 * math.log(q[i] / m[i]) for i in range(V)]
    elif name == "tv":
        value = 0.5 * sum(abs(p[i] - q[i]) for i in range(V))
        g = [0.5 * (1.0 if q[i] > p[i] else -1.0) for i in range(V)]
    elif name == "ce":
        value, g = -math.log(q[star]), [(-1 / q[i] if i == star else 0.0) for i in range(V)]
    elif name == "nla":
        value, g = -math.log(alpha), [-below[i] / alpha for i in range(V)]
    elif name == "lk":  # lam is held constant: no gradient through it
        value = lam * kl + (1 - lam) * (1 - alpha)
        g = [lam * (-p[i] / q[i]) + (1 - lam) * (-below[i]) for i in range(V)]
    else:
        raise AssertionError(name)
    grad = [
        sum(g[i] * q[i] * ((1.0 if i == j else 0.0) - q[j]) for i in range(V)) for j in range(V)
    ]
    return value, grad


@pytest.mark.parametrize("name", sorted(BUILTIN_OBJECTIVES))
def test_each_objective_matches_its_plain_loop_derivation(name: str):
    torch.manual_seed(1)
    logits = (torch.randn(N, V) * 2).requires_grad_(True)
    target_logits = torch.randn(N, V) * 2
    loss, _ = BUILTIN_OBJECTIVES[name]
    values = loss(logits, TargetDistribution.from_logits(target_logits))
    assert values.shape == (N,) and values.dtype == torch.float32
    weights = torch.arange(1.0, N + 1)  # distinct per-row weights: rows must not mix
    (values * weights).sum().backward()
    for row in range(N):
        want, want_grad = _plain(name, logits[row].tolist(), target_logits[row].tolist())
        assert values[row].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
        got_grad = (logits.grad[row] / weights[row]).tolist()
        assert got_grad == pytest.approx(want_grad, rel=1e-4, abs=1e-6)


def test_the_lean_forward_kl_is_the_textbook_one():
    torch.manual_seed(2)
    logits = torch.randn(N, V, requires_grad=True)
    target = torch.randn(N, V)
    loss, _ = BUILTIN_OBJECTIVES["kl"]
    lean = loss(logits, TargetDistribution.from_logits(target))
    plain = torch.nn.functional.kl_div(
        torch.log_softmax(logits, -1), torch.log_softmax(target, -1), log_target=True,
        reduction="none",
    ).sum(-1)  # fmt: skip
    assert torch.allclose(lean, plain, atol=1e-6)
    (g_lean,) = torch.autograd.grad(lean.sum(), logits)
    (g_plain,) = torch.autograd.grad(plain.sum(), logits)
    assert torch.allclose(g_lean, g_plain, atol=1e-6)


def test_a_weighted_mix_is_the_weighted_sum():
    torch.manual_seed(3)
    logits = torch.randn(N, V, requires_grad=True)
    target = TargetDistribution.from_logits(torch.randn(N, V))
    mix = resolve_objective("kl=0.25,tv=2,lk", PluginHost())
    assert mix.names == ["kl", "tv", "lk"] and mix.spec == "kl=0.25,tv=2,lk"
    got = mix(logits, target)
    kl, tv, lk = (BUILTIN_OBJECTIVES[n][0](logits, target) for n in ("kl", "tv", "lk"))
    want = 0.25 * kl + 2 * tv + lk
    assert torch.allclose(got, want, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_want,) = torch.autograd.grad(want.sum(), logits)
    assert torch.allclose(g_got, g_want, atol=1e-6)


def _saved_bytes(compute, *inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What ``compute()`` returns, and the bytes autograd still keeps for its backward pass
    once it has returned: tensors saved and freed inside the call do not count, nor do the
    ``inputs`` (they exist anyway)."""
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = compute()
    gc.collect()
    given = {t.untyped_storage().data_ptr() for t in inputs}
    alive = {
        (t.data_ptr(), t.numel() * t.element_size())
        for r in saved
        if (t := r()) is not None and t.untyped_storage().data_ptr() not in given
    }
    return value, sum(size for _, size in alive)


@pytest.mark.parametrize("spec", [*sorted(BUILTIN_OBJECTIVES), "kl=0.5,jsd=0.5"])
def test_the_lean_path_is_plain_autograd_with_one_tensor_kept(spec: str, monkeypatch):
    """Value and gradient of every objective through the chunked lean path equal ordinary
    autograd's, and the backward pass keeps one [N, V] tensor instead of all temporaries."""
    import speculators_core.objectives as objectives

    rows, vocab = 10, 64
    monkeypatch.setattr(objectives, "LEAN_CHUNK_ELEMENTS", 3 * vocab)  # chunks of 3, 3, 3, 1
    torch.manual_seed(4)
    logits = (torch.randn(rows, vocab) * 2).requires_grad_(True)
    target = TargetDistribution.from_logits(torch.randn(rows, vocab) * 2)
    objective = resolve_objective(spec, PluginHost())
    given = (logits, target.log_probs, target.probs, target.ids)
    lean, lean_bytes = _saved_bytes(lambda: objective(logits, target), *given)
    plain, plain_bytes = _saved_bytes(lambda: objective.plain(logits, target), *given)
    assert torch.allclose(lean, plain, atol=1e-6)
    weights = torch.arange(1.0, rows + 1)
    (g_lean,) = torch.autograd.grad((lean * weights).sum(), logits)
    (g_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    assert torch.allclose(g_lean, g_plain, atol=1e-6)
    one = rows * vocab * 4
    assert lean_bytes <= one + 1024
    # Ordinary autograd keeps two to four [N, V] tensors for these (kl's backward is
    # hand-written already; ce and nla keep one softmax either way).
    if spec in ("jsd", "rkl", "lk", "tv", "kl=0.5,jsd=0.5"):
        assert plain_bytes >= 2 * one
    with torch.no_grad():  # evaluation keeps nothing and computes no gradient
        assert torch.allclose(objective(logits, target), plain, atol=1e-6)


def test_specs_parse_and_bad_ones_are_one_line():
    assert parse_objective_spec("kl") == [("kl", 1.0)]
    assert parse_objective_spec(" kl=0.5, lk=0.5 ") == [("kl", 0.5), ("lk", 0.5)]
    # The reference system's JSON form and names.
    assert parse_objective_spec('{"kl_div": 0.1, "lk_hybrid": 0.9}') == [("kl", 0.1), ("lk", 0.9)]
    for bad, message in [
        ("", "the objective is empty"),
        ("kl=-1", "with positive weights"),
        ("kl=x", "'kl=x' is the problem"),
        ("kl,kl_div=2", "names 'kl' twice"),
        ("{nope", "not a JSON object"),
    ]:
        with pytest.raises(SpeculatorsError, match=message) as info:
            parse_objective_spec(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(SpeculatorsError, match=r"objective 'focal' \(installed: ce, jsd, kl, lk"):
        resolve_objective("kl=1,focal=1", PluginHost())


def test_speculators_register_objectives():
    """A plugin's hook adds an objective next to the core's; a mix may use both."""

    def double_ce(logits: torch.Tensor, target: TargetDistribution) -> torch.Tensor:
        return 2 * BUILTIN_OBJECTIVES["ce"][0](logits, target)

    class Plugin:
        @hookimpl
        def speculators_register_objectives(self) -> list[Objective]:
            return [Objective(name="double-ce", loss=double_ce, description="2 x ce")]

    host = PluginHost(
        PluginSettings(), entry_points=False, plugins=[("speculators.plugins:x", Plugin())]
    )
    assert {"kl", "double-ce"} <= set(host.objectives())
    assert host.objective("double-ce").provided_by
    torch.manual_seed(4)
    logits, target = torch.randn(N, V), TargetDistribution.from_logits(torch.randn(N, V))
    mix = resolve_objective("double-ce=0.5,kl=1", host)
    kl = BUILTIN_OBJECTIVES["kl"][0](logits, target)
    assert torch.allclose(mix(logits, target), BUILTIN_OBJECTIVES["ce"][0](logits, target) + kl)
