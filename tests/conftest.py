import pytest
import torch

from ppl_kbnn.moments import set_validation


@pytest.fixture(autouse=True)
def float64_and_seed():
    """Every test compares numbers in float64 with a fixed seed, one torch thread; validation on."""
    old = torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    set_validation(True)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def random_psd(n: int, gen: torch.Generator, scale: float = 1.0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """A random full-rank covariance ``scale * A Aᵀ / n + 0.05 scale I``."""
    A = torch.randn(*batch, n, n, generator=gen)
    return scale * (A @ A.mT / n + 0.05 * torch.eye(n))


# --------------------------------------------------------------------------------------------- shared references
#
# NUTS references are the expensive part of the suite. Each is computed once per session, in a background process
# started as soon as the tests are collected (its chains one after the other, one thread), while the rest of the
# suite runs on the other core; the tests that need a reference are moved to the end of the run, where they wait
# for it. tests/_references.py holds what the workers run.

_REFERENCES = {"mlp_reference": "mlp_reference", "transformer_reference": "transformer_reference"}
_background: dict = {}


def pytest_collection_modifyitems(session, config, items):
    """Start the references the selected tests need, and run those tests last."""
    needed = {name for item in items for name in getattr(item, "fixturenames", ()) if name in _REFERENCES}
    if not needed:
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import _references

    pool = ProcessPoolExecutor(max_workers=len(needed), mp_context=multiprocessing.get_context("spawn"))
    _background["pool"] = pool
    for name in sorted(needed):
        _background[name] = pool.submit(getattr(_references, _REFERENCES[name]))
    items.sort(key=lambda item: any(n in _REFERENCES for n in getattr(item, "fixturenames", ())))  # stable


def pytest_sessionfinish(session, exitstatus):
    pool = _background.pop("pool", None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


class _Float64:
    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


@pytest.fixture(scope="session")
def mlp_reference():
    """The 16-unit ReLU MLP problem against NUTS, with the SVI baselines on the same model and data.

    ``Linear(1,16) → ReLU → Linear(16,1)`` pre-trained on sin(x), prior_scale 0.1 around the pre-trained weights,
    obs_noise 0.1, 50 samples of sin(x) + 0.3x, 20 test inputs; NUTS 2 chains (JIT, dense mass matrix, 300 warm-up +
    1000 draws each; measured max R-hat 1.0037); SVI-normal and SVI-lowrank, 2000 steps. A dict: model, X, Y, Xt,
    samples, rhat, nuts_mean, nuts_std (incl. noise), svi = {name: (mean, std)}.
    """
    import _references

    with _Float64():
        model, X, Y, Xt = _references.mlp_problem()
    ref = _background["mlp_reference"].result()
    return {"model": model, "X": X, "Y": Y, "Xt": Xt, "rhat": ref["diagnostics"]["max_rhat"], **ref}


@pytest.fixture(scope="session")
def transformer_reference():
    """The tiny transformer problem against NUTS (d_model 8, 1 layer, 1 head, 6 tokens, 40 samples, 873 weights,
    prior_scale 0.05, obs_noise 0.1, 20 held-out inputs), with SVI-normal (3000 steps) on the same model and data.

    NUTS: 2 chains × (500 warm-up + 1500 draws), JIT, diagonal mass matrix. A dict: model, x, y, xt, diagnostics
    (of NUTS), nuts_mean, nuts_std, svi_normal = (mean, std).
    """
    import _references

    with _Float64():
        model, x, y, xt = _references.transformer_problem()
    return {"model": model, "x": x, "y": y, "xt": xt, **_background["transformer_reference"].result()}


@pytest.fixture(scope="session")
def quick_validate(tmp_path_factory):
    """``ppl-kbnn validate --quick`` through the command line, once per session (every section; its NUTS reference
    is the expensive part). A dict: out (the directory), code (exit status), stdout, report (report.json)."""
    import contextlib
    import io
    import json

    from ppl_kbnn.cli import main

    out = tmp_path_factory.mktemp("validate-quick")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["validate", "--quick", "--no-progress", "--out", str(out)])
    return {"out": out, "code": code, "stdout": buf.getvalue(), "report": json.loads((out / "report.json").read_text())}
