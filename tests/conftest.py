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
# NUTS references are the expensive part of the suite: each is computed once per test session (session-scoped
# fixtures) and shared by every test that compares against it.


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
    obs_noise 0.1, 50 samples of sin(x) + 0.3x, 20 test inputs; NUTS with 2 chains side by side (JIT, dense mass
    matrix, 300 warm-up + 1000 draws each; measured max R-hat 1.0041); SVI-normal and SVI-lowrank, 2000 steps.
    Returns a dict: model, X, Y, Xt, samples, rhat, nuts_mean, nuts_std (incl. noise), svi = {name: (mean, std)}.
    """
    import ppl_kbnn as pk
    from ppl_kbnn.toy import pretrained_mlp, regression_stream

    with _Float64():
        model = pk.BayesianModel(pretrained_mlp(16), prior_scale=0.1, obs_noise=0.1)
        X, Y = regression_stream(50)
        Xt = torch.linspace(-2.8, 2.8, 20)[:, None]
        ref = pk.inference.nuts(model, X, Y, num_samples=1000, warmup_steps=300, num_chains=2, seed=0,
                                full_mass=True, processes=2)  # fmt: skip
        mean, std = ref.predict(Xt)  # (20, 1) each; std includes the observation noise
        svi = {}
        for kind in ("normal", "lowrank"):
            res = pk.inference.svi(model, X, Y, guide=kind, num_steps=2000, lr=0.01, seed=0, num_predict=2000)
            m, s = res.predict(Xt)
            svi[kind] = (m[:, 0], s[:, 0])
        return {"model": model, "X": X, "Y": Y, "Xt": Xt, "samples": ref.samples, "rhat": ref.diagnostics["max_rhat"],
                "nuts_mean": mean[:, 0], "nuts_std": std[:, 0], "svi": svi}  # fmt: skip


@pytest.fixture(scope="session")
def transformer_reference():
    """The tiny transformer problem against NUTS (d_model 8, 1 layer, 1 head, 6 tokens, 40 samples, 873 weights,
    prior_scale 0.05, obs_noise 0.1, 20 held-out inputs), with SVI-normal (3000 steps) on the same model and data.

    NUTS: 2 chains × (500 warm-up + 1500 draws), JIT, diagonal mass matrix, side by side in two processes.
    Returns a dict: model, x, y, xt, ref (the NUTS result), nuts_mean, nuts_std, svi_normal = (mean, std).
    """
    import ppl_kbnn as pk
    from ppl_kbnn.toy import teacher_student_transformer

    with _Float64():
        student, _, x, y, xt, _ = teacher_student_transformer()
        model = pk.BayesianModel(student, prior_scale=0.05, obs_noise=0.1)
        ref = pk.inference.nuts(model, x, y, num_samples=1500, warmup_steps=500, num_chains=2, seed=0, processes=2)
        mean, std = ref.predict(xt)
        svi = pk.inference.svi(model, x, y, guide="normal", num_steps=3000, lr=0.01, seed=0, num_predict=500)
        return {"model": model, "x": x, "y": y, "xt": xt, "ref": ref, "nuts_mean": mean, "nuts_std": std,
                "svi_normal": svi.predict(xt)}  # fmt: skip


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
