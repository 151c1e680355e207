"""The reliability tests' shared fixtures (defined in fault_kit.py): one tiny fixture with a
reference store per session, and a forkserver for killable `mdiff` processes."""

from tests.reliability.fault_kit import forkserver, kit  # noqa: F401
