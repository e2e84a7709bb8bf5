"""The parts of tests/e2e/test_fuzz.py: which routes there are, what to send them, and how
to judge the answers."""
