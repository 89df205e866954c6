"""pyproject.toml's filterwarnings, the one place warnings are filtered: a deprecation attributed to this
repository's code is an error in the suite; one raised inside a third-party package stays quiet."""

import warnings

import pytest


def warn_from(module: str, category) -> None:
    """warnings.warn as code of `module` calls it (the warning is attributed to the calling module)."""
    code = compile(f"warnings.warn('old API', {category.__name__})", f"<{module}>", "exec")
    exec(code, {"__name__": module, "warnings": warnings})


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
@pytest.mark.parametrize("module", ["dpo.train.trainer", "recipe_dpo_any", "bench_training", "test_something"])
def test_a_deprecation_from_our_code_is_an_error(module, category):
    with pytest.raises(category, match="old API"):
        warn_from(module, category)


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
@pytest.mark.parametrize("module", ["transformers.training_args", "torch.nn.modules", "dpo_lookalike"])
def test_a_deprecation_inside_a_library_stays_quiet(module, category):
    with warnings.catch_warnings(record=True) as seen:
        warn_from(module, category)
    assert seen == []  # filtered by the ignore lines, not turned into an error
