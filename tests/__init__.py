"""The test suite, laid out as the package (see support/ for what tests share)."""
