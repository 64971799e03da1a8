"""A real image benchmark on scikit-learn's 8x8 digits: data, a small score network and a
classifier trained by our own script (`python -m experiments.suites.digits.train`), and the
experiments `digits_reward` and `digits_fkc` (`experiments.suites.digits.experiment`)."""
