"""Shape planner: the paper's configs reproduced exactly, exact parameter counts, and one-line errors."""

import pytest
import torch

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops import project_to_spec, structured_from_spec
from procrustes_onnx.ops.linalg import torch_threads
from procrustes_onnx.ops.planner import family_spec, gs_spec, kron_spec, plan_gs, plan_kronecker, plan_matrix, spec_params


@pytest.fixture(autouse=True)
def _one_thread():
    """Small float64 solves: 1 thread avoids OpenMP stalls on a shared machine (see torch_threads)."""
    with torch_threads(1):
        yield


# method.md §3.3, Llama-2-7B GS configs (kl, bl1, bl2 | kr, br1, br2)
PAPER_GS = [
    (4096, 4096, "in", "3/4", (4, 1024, 1024), (2, 2048, 2048)),       # q, k
    (4096, 4096, "out", "3/4", (2, 2048, 2048), (4, 1024, 1024)),      # o
    (4096, 11008, "in", "3/4", (4, 1024, 3522), (8, 1761, 1376)),      # gate, up
    (11008, 4096, "out", "3/4", (8, 1376, 1761), (4, 3522, 1024)),     # down
    (4096, 4096, "in", "1/2", (4, 1024, 1024), (4, 1024, 1024)),
    (4096, 11008, "in", "1/2", (4, 1024, 863), (2, 1726, 5504)),
    (4096, 4096, "in", "5/8", (8, 512, 512), (2, 2048, 2048)),
    (4096, 11008, "in", "5/8", (4, 1024, 1866), (4, 1866, 2752)),
]


@pytest.mark.parametrize("n_in,n_out,side,kept,left,right", PAPER_GS)
def test_gs_reproduces_paper_configs(n_in, n_out, side, kept, left, right):
    plan = plan_gs(n_in, n_out, side, kept)
    assert (tuple(plan.spec["left"]), tuple(plan.spec["right"])) == (left, right)
    assert plan.params == left[0] * left[1] * left[2] + right[0] * right[1] * right[2]


@pytest.mark.parametrize("kept,r,q", [("3/4", 3, 4), ("5/8", 5, 8), ("1/2", 1, 2)])
def test_kron_paper_configs_smollm2(kept, r, q):
    # SmolLM2-135M: d = 576, GQA k/v 192, d_ff 1536
    for n_in, n_out, side in [(576, 576, "in"), (576, 192, "in"), (576, 1536, "in"), (576, 576, "out"),
                              (1536, 576, "out")]:
        plan = plan_kronecker(n_in, n_out, side, kept)
        d, n = (n_in, n_out) if side == "in" else (n_out, n_in)
        a, b = ((q, 1), (d // q, n)) if side == "in" else ((1, q), (n, d // q))
        assert plan.spec == {"kind": "kron", "rank": r, "a_shape": list(a), "b_shape": list(b), "in": n_in, "out": n_out}
        assert plan.params == r * (q + d * n // q)                       # exact
        assert abs(plan.kept - r / q) < 1e-3 * (1 + q)
    assert plan_kronecker(576, 576, "in", "3/4").params == 248844      # 3 * (4 + 144*576)


def test_plans_build_matrices_with_those_counts():
    for side in ("in", "out"):
        for kept in ("3/4", "5/8", "1/2", 0.6):
            for plan in plan_matrix(576, 192, side, kept).values():
                mat = structured_from_spec(plan.spec)
                assert mat.num_params == plan.params == spec_params(plan.spec)
                assert mat.shape == (576, 192)


def test_free_fraction_is_close_and_projectable():
    plans = plan_matrix(64, 96, "in", 0.6)
    for plan in plans.values():
        assert abs(plan.kept - 0.6) <= 0.02
        m = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
        assert project_to_spec(m, plan.spec).shape == (64, 96)
    assert plan_matrix(64, 96, "in", 1.0)["kron"].spec["kind"] == "dense"


@pytest.mark.parametrize("call", [
    lambda: plan_kronecker(100, 64, "in", "5/8"),     # q = 8 does not divide 100
    lambda: plan_gs(100, 63, "in", "3/4"),            # no block counts divide 63
    lambda: plan_kronecker(64, 64, "sideways", 0.5),
    lambda: plan_kronecker(64, 64, "in", 1.5),
    lambda: plan_gs(64, 64, "in", "three quarters"),
    lambda: plan_kronecker(97, 64, "in", 0.5),        # prime rotated side: no q
])
def test_impossible_requests_raise_one_line_user_error(call):
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value)


def test_error_lists_nearest_choices():
    with pytest.raises(UserError, match=r"nearest valid: kron 100x64 r=\d+ a\(\d+, 1\)"):
        plan_kronecker(100, 64, "in", "5/8")


def test_family_spec_is_the_kind_table():
    assert family_spec("kron", 576, 192, 0.5, split="out", q=8) == kron_spec(576, 192, "out", 0.5, 8)
    assert family_spec("gs", 576, 192, 0.5) == gs_spec(576, 192, 0.5)
    with pytest.raises(UserError):
        family_spec("dense", 576, 192, 0.5)
