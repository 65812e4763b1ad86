"""dsire's tests: a package, so `tests.conftest` is ours even where another installed package ships a `tests`."""
